//! What `strata sync` needs of a side of a copy: list one directory level, stream a file's
//! bytes out, write a file under a temporary name and rename it into place, and the
//! metadata each kind of endpoint can carry ([`Caps`]). Paths are relative to the endpoint's
//! root, `/`-separated, `""` for the root itself.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::{Result, SyncError};

/// Kind of a listed entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// Devices, FIFOs, sockets: not copied (counted as unsupported).
    Other,
}

/// One entry of a directory listing, with the attributes the endpoint knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub name: String,
    pub kind: Kind,
    pub size: u64,
    /// Nanoseconds since the Unix epoch (S3: the object's Last-Modified).
    pub mtime: i64,
    pub atime: i64,
    /// Permission bits (0o7777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// Identity of the inode (hard links share it); 0 where the endpoint has none.
    pub id: u64,
}

impl Item {
    /// An entry with only a name, kind, size and time (what an S3 listing tells).
    pub fn plain(name: String, kind: Kind, size: u64, mtime: i64) -> Item {
        Item {
            name,
            kind,
            size,
            mtime,
            atime: mtime,
            mode: if kind == Kind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            nlink: 1,
            id: 0,
        }
    }
}

/// What an endpoint keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Modes, owners, exact modification and access times.
    pub attrs: bool,
    pub xattrs: bool,
    pub symlinks: bool,
    pub hardlinks: bool,
    /// Directories exist by themselves (S3: only as key prefixes).
    pub dirs: bool,
}

/// Calls an endpoint made, for the summary: directory listings (S3: LIST requests), other
/// metadata calls (Strata: metadata-engine operations; local: stat/readlink/xattr system
/// calls), and the listings made only to find the path of a changed directory.
#[derive(Debug, Default)]
pub struct Counters {
    pub lists: AtomicU64,
    pub meta_calls: AtomicU64,
    pub path_lists: AtomicU64,
}

impl Counters {
    pub fn list(&self) {
        self.lists.fetch_add(1, Ordering::Relaxed);
    }
    pub fn meta(&self, n: u64) {
        self.meta_calls.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> (u64, u64, u64) {
        (
            self.lists.load(Ordering::Relaxed),
            self.meta_calls.load(Ordering::Relaxed),
            self.path_lists.load(Ordering::Relaxed),
        )
    }
}

/// A file being read: pieces in order, `None` at the end.
pub trait Reader: Send {
    fn next(&mut self) -> Result<Option<Bytes>>;
}

/// A file being written under a temporary name; [`Writer::commit`] sets its attributes and
/// extended attributes and renames it over `path`, [`Writer::abort`] removes it.
pub trait Writer: Send {
    fn write(&mut self, data: &[u8]) -> Result<()>;
    fn commit(self: Box<Self>, item: &Item, xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<()>;
    fn abort(self: Box<Self>);
}

/// Prefix of the temporary names files are written under (`.strata-sync.NAME`); entries
/// with this prefix at a destination are leftovers of a killed run: removed, never copied.
pub const TEMP_PREFIX: &str = ".strata-sync.";

pub fn temp_name(name: &str) -> String {
    // Names are at most 255 bytes: keep the temporary name within it.
    let mut end = name.len().min(255 - TEMP_PREFIX.len());
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{TEMP_PREFIX}{}", &name[..end])
}

pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Split `a/b/c` into (`a/b`, `c`).
pub fn split(path: &str) -> (&str, &str) {
    match path.rsplit_once('/') {
        Some((d, n)) => (d, n),
        None => ("", path),
    }
}

/// One side of a sync.
pub trait Endpoint: Send + Sync {
    /// For messages: the URL or path, without secrets.
    fn describe(&self) -> String;
    fn caps(&self) -> Caps;
    fn counters(&self) -> &Counters;
    /// Attributes of the entry at `path` (`""`: the root); `None` when it does not exist
    /// (S3: always, a prefix has no attributes).
    fn stat(&self, path: &str) -> Result<Option<Item>>;
    /// Entries of a directory in name order; `None` when the directory does not exist.
    fn list(&self, dir: &str) -> Result<Option<Vec<Item>>>;
    /// Read a file; `item` as this endpoint listed it.
    fn open(&self, path: &str, item: &Item) -> Result<Box<dyn Reader>>;
    fn create(&self, path: &str, item: &Item) -> Result<Box<dyn Writer + '_>>;
    /// Create a directory (nothing if it exists).
    fn mkdir(&self, path: &str, item: &Item) -> Result<()>;
    /// Set mode, owner and times (only called where [`Caps::attrs`]).
    fn set_attrs(&self, path: &str, item: &Item) -> Result<()>;
    fn readlink(&self, path: &str) -> Result<Vec<u8>>;
    /// Create a symbolic link with `item`'s owner and times, replacing what is at `path`.
    fn symlink(&self, path: &str, target: &[u8], item: &Item) -> Result<()>;
    /// A hard link at `path` to the file at `existing`, replacing what is at `path`.
    fn link(&self, existing: &str, path: &str) -> Result<()>;
    /// Remove an entry (a directory with everything below it).
    fn remove(&self, path: &str, kind: Kind) -> Result<()>;
    /// Extended attributes worth copying (not `system.*`, `security.*` or Strata's own), by
    /// name; `listed`: the entry as this endpoint listed it (its identity saves a lookup).
    fn xattrs(&self, path: &str, listed: Option<&Item>) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// Make the extended attributes exactly `want`.
    fn set_xattrs(&self, path: &str, want: &[(Vec<u8>, Vec<u8>)]) -> Result<()>;
    /// Store everything written durably and release the endpoint.
    fn finish(&self) -> Result<()> {
        Ok(())
    }
    /// The end of the change journal now (Strata volumes only).
    fn change_token(&self) -> Result<Option<String>> {
        Ok(None)
    }
    /// Paths (relative to the root) of the directories changed after `token`; `Err(why)`
    /// when the journal cannot tell (trimmed, another database, files with several links
    /// changed): a full pass is needed.
    fn changed_dirs(&self, _token: &str) -> Result<std::result::Result<Vec<String>, String>> {
        Err(SyncError::Invalid(format!(
            "--since needs a Strata volume as SRC (META_URL with --src-path); {} has no change journal",
            self.describe()
        )))
    }
}

/// Whether an extended attribute is copied between endpoints.
pub fn copied_xattr(name: &[u8]) -> bool {
    !(name.starts_with(b"system.")
        || name.starts_with(b"security.")
        || name.starts_with(crate::meta::RESERVED_XATTR_PREFIX))
}
