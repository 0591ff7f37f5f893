//! A store in a local directory: each key is a file at the same relative path.

use std::fs::{self, File};
use std::io::{self, ErrorKind};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::{ObjectError, ObjectInfo, ObjectStore, Result};
use crate::directio::DirectWrites;

/// Piece size of streamed reads.
const STREAM_PIECE: usize = 256 << 10;

/// A read-only shared mapping of part of a file (object files are never modified in place:
/// puts write a new file and rename it over the old one, so mapped bytes never change).
struct Mapped {
    base: *mut libc::c_void,
    map_len: usize,
    /// Offset of the wanted bytes inside the mapping (mappings start at a page boundary).
    skip: usize,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value alone.
unsafe impl Send for Mapped {}
unsafe impl Sync for Mapped {}

impl Mapped {
    fn new(file: &File, off: u64, len: usize) -> io::Result<Mapped> {
        if len == 0 {
            return Ok(Mapped {
                base: std::ptr::null_mut(),
                map_len: 0,
                skip: 0,
                len: 0,
            });
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        let start = off / page * page;
        let skip = (off - start) as usize;
        let map_len = skip + len;
        // SAFETY: a fresh read-only mapping of an open file; checked for failure below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                std::os::fd::AsRawFd::as_raw_fd(file),
                start as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapped {
            base,
            map_len,
            skip,
            len,
        })
    }
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the mapping covers `skip + len` readable bytes and lives as long as self.
        unsafe { std::slice::from_raw_parts((self.base as *const u8).add(self.skip), self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if self.map_len > 0 {
            // SAFETY: unmapping exactly the mapping made in `new`.
            unsafe { libc::munmap(self.base, self.map_len) };
        }
    }
}

/// Marker in the names of files being written; such files are never listed and keys may not
/// contain it.
const TMP_MARK: &str = ".strata-tmp-";

/// Objects as files under a root directory. Puts are atomic (temp file, rename) and survive
/// a crash of the process at once (the kernel or the device holds the bytes; puts of 1 MiB or
/// more skip the page cache where the file system allows, [`DirectWrites`]);
/// [`ObjectStore::sync`] makes
/// them durable against a crash of the machine (file and directory fsync), which the file
/// system asks for on fsync(2). Reads can map files instead of copying them
/// ([`ObjectStore::map`]).
///
/// Ownership: a process running as root (euid 0) gives every file and directory it creates
/// the owner of the root directory, so that a store made by an unprivileged user (e.g. the
/// operator, uid 65532) stays usable by that user and by mount clients running as it.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    tmp_seq: AtomicU64,
    /// (uid, gid) new files and directories get; `None`: keep the creator's. Decided on the
    /// first write.
    owner: OnceLock<Option<(u32, u32)>>,
    /// Big puts skip the page cache where the file system allows.
    direct: DirectWrites,
}

/// The owner (uid, gid) of `path` or, when it does not exist, of its nearest existing
/// ancestor.
fn owner_of_nearest(path: &Path) -> Option<(u32, u32, PathBuf)> {
    let mut p = Some(path);
    while let Some(d) = p {
        if let Ok(m) = fs::metadata(d) {
            return Some((m.uid(), m.gid(), d.to_path_buf()));
        }
        p = d.parent();
    }
    None
}

/// The effective uid and gid of this process.
fn euid_egid() -> (u32, u32) {
    // SAFETY: geteuid/getegid have no preconditions.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

impl LocalStore {
    /// A store rooted at `root` (made absolute; created by [`ObjectStore::init`] or the first
    /// put).
    pub fn new(root: impl AsRef<Path>) -> Self {
        let root = root.as_ref();
        let root = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
        let root_for_direct = root.clone();
        LocalStore {
            root,
            tmp_seq: AtomicU64::new(0),
            owner: OnceLock::new(),
            direct: DirectWrites::new(root_for_direct, 16),
        }
    }

    /// Owner for new files and directories: the root directory's (or its nearest existing
    /// ancestor's) when this process is root and that owner is another user, else `None`.
    fn owner(&self) -> Option<(u32, u32)> {
        *self.owner.get_or_init(|| {
            if euid_egid().0 != 0 {
                return None;
            }
            match owner_of_nearest(&self.root) {
                Some((uid, gid, _)) if uid != 0 => Some((uid, gid)),
                _ => None,
            }
        })
    }

    /// `create_dir_all`, giving the directories it creates to [`Self::owner`].
    fn create_dirs(&self, dir: &Path) -> io::Result<()> {
        let Some((uid, gid)) = self.owner() else {
            return fs::create_dir_all(dir);
        };
        let mut missing = Vec::new();
        let mut d = Some(dir);
        while let Some(p) = d {
            if p.is_dir() {
                break;
            }
            missing.push(p);
            d = p.parent();
        }
        fs::create_dir_all(dir)?;
        for p in missing.into_iter().rev() {
            std::os::unix::fs::lchown(p, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    /// Pass `advice` on the object's file to the kernel (a hint: errors are ignored).
    fn advise(&self, key: &str, advice: libc::c_int) {
        if let Ok(path) = self.path_of(key)
            && let Ok(file) = File::open(path)
        {
            // SAFETY: a plain syscall on an open file descriptor; the result is a hint.
            unsafe {
                libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, advice);
            }
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file of `key`, or an error if the key could escape the root or clash with temp files.
    fn path_of(&self, key: &str) -> Result<PathBuf> {
        let bad = key.is_empty()
            || key.contains('\0')
            || key.contains(TMP_MARK)
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..");
        if bad {
            return Err(ObjectError::Other(format!(
                "invalid key {key:?} for a file store: keys are relative paths without empty, \
                 `.` or `..` components"
            )));
        }
        Ok(self.root.join(key))
    }

    fn io_err(&self, key: &str, e: io::Error) -> ObjectError {
        match e.kind() {
            // `a/b` when `a` is a file: no such object either.
            ErrorKind::NotFound | ErrorKind::NotADirectory => {
                ObjectError::NotFound(key.to_string())
            }
            // A local permission problem, not a credential one: name the path, the errno,
            // who this process is and who owns the place.
            ErrorKind::PermissionDenied => ObjectError::Other(self.permission_error(key, &e)),
            ErrorKind::Interrupted | ErrorKind::TimedOut | ErrorKind::WouldBlock => {
                ObjectError::Transient(format!("{} ({key}): {e}", self.describe()))
            }
            _ => ObjectError::Other(format!("{} ({key}): {e}", self.describe())),
        }
    }

    /// "file:///b: /b/vol/k: Permission denied (os error 13); this process runs as uid 0
    /// gid 0, /b/vol belongs to uid 65532 gid 65532 (mode 755)".
    fn permission_error(&self, key: &str, e: &io::Error) -> String {
        let path = if key.is_empty() {
            self.root.clone()
        } else {
            self.root.join(key)
        };
        let (uid, gid) = euid_egid();
        let mut msg = format!(
            "{}: {}: {e}; this process runs as uid {uid} gid {gid}",
            self.describe(),
            path.display()
        );
        // The directory that refused: the nearest existing one above the object.
        if let Some((ouid, ogid, at)) = path.parent().and_then(owner_of_nearest) {
            let mode = fs::metadata(&at).map(|m| m.mode() & 0o7777).unwrap_or(0);
            msg.push_str(&format!(
                ", {} belongs to uid {ouid} gid {ogid} (mode {mode:o})",
                at.display()
            ));
        }
        msg
    }

    fn write_atomic(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let dir = path.parent().unwrap_or(&self.root);
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("obj");
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!("{name}{TMP_MARK}{}-{seq}", std::process::id()));
        // A concurrent delete may remove the (empty) directory between our mkdir and create.
        let mut attempt = 0;
        let file = loop {
            self.create_dirs(dir)?;
            match File::create(&tmp) {
                Ok(f) => break f,
                Err(e) if e.kind() == ErrorKind::NotFound && attempt < 3 => attempt += 1,
                Err(e) => return Err(e),
            }
        };
        let owned = match self.owner() {
            Some((uid, gid)) => std::os::unix::fs::fchown(&file, Some(uid), Some(gid)),
            None => Ok(()),
        };
        let written = owned.and_then(|()| self.direct.write_all(&file, data));
        let renamed = written.and_then(|()| fs::rename(&tmp, path));
        if let Err(e) = renamed {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        // Start writing the bytes back now, so that a later fsync (or the kernel's own
        // writeback) finds little left to do and dirty pages do not pile up.
        // SAFETY: a plain syscall on an open file descriptor.
        unsafe {
            libc::sync_file_range(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
                0,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        Ok(())
    }

    /// Remove now-empty parent directories of a deleted file, up to the root (best effort).
    fn prune_dirs(&self, path: &Path) {
        let mut dir = path.parent();
        while let Some(d) = dir {
            if d == self.root || !d.starts_with(&self.root) || fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
    }

    /// Append to `out` the objects under directory `dir` (whose keys start with `base`) that
    /// match `prefix` and sort after `start_after`, in key order, until `limit` is reached.
    fn walk(
        &self,
        dir: &Path,
        base: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        out: &mut Vec<ObjectInfo>,
    ) -> io::Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        // Sort by the key text each entry stands for: a directory `d` holds keys `d/...`, so it
        // sorts as "d/" (this puts `a-b` before `a/x`, as in byte order of the full keys).
        let mut items = Vec::new();
        for entry in entries {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.contains(TMP_MARK) {
                continue;
            }
            let is_dir = entry.file_type()?.is_dir();
            let key = if is_dir {
                format!("{base}{name}/")
            } else {
                format!("{base}{name}")
            };
            items.push((key, is_dir, entry.path()));
        }
        items.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (key, is_dir, path) in items {
            if out.len() >= limit {
                break;
            }
            if is_dir {
                // Skip directories that cannot hold a matching key.
                let overlaps = key.starts_with(prefix) || prefix.starts_with(key.as_str());
                let all_before =
                    start_after.is_some_and(|s| key.as_str() < s && !s.starts_with(key.as_str()));
                if overlaps && !all_before {
                    self.walk(&path, &key, prefix, start_after, limit, out)?;
                }
            } else if key.starts_with(prefix) && start_after.is_none_or(|s| key.as_str() > s) {
                match fs::metadata(&path) {
                    Ok(m) => out.push(ObjectInfo {
                        key,
                        size: m.len(),
                        modified: mtime_secs(&m),
                    }),
                    Err(e) if e.kind() == ErrorKind::NotFound => {} // deleted meanwhile
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn init(&self) -> Result<()> {
        self.create_dirs(&self.root)
            .map_err(|e| self.io_err("", e))?;
        let meta = fs::metadata(&self.root).map_err(|e| self.io_err("", e))?;
        if !meta.is_dir() {
            return Err(ObjectError::Other(format!(
                "{} is not a directory",
                self.root.display()
            )));
        }
        Ok(())
    }

    fn get(&self, key: &str, off: u64, len: Option<u64>) -> Result<Bytes> {
        let path = self.path_of(key)?;
        let file = File::open(&path).map_err(|e| self.io_err(key, e))?;
        let meta = file.metadata().map_err(|e| self.io_err(key, e))?;
        if meta.is_dir() {
            return Err(ObjectError::NotFound(key.to_string()));
        }
        let size = meta.len();
        let start = off.min(size);
        let end = len.map_or(size, |l| start.saturating_add(l).min(size));
        let mut buf = vec![0u8; (end - start) as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], start + done as u64) {
                Ok(0) => break, // the file cannot shrink (objects are immutable), but be safe
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err(key, e)),
            }
        }
        buf.truncate(done);
        Ok(Bytes::from(buf))
    }

    fn get_stream(&self, key: &str, off: u64, sink: &mut dyn FnMut(&[u8])) -> Result<u64> {
        let path = self.path_of(key)?;
        let file = File::open(&path).map_err(|e| self.io_err(key, e))?;
        let meta = file.metadata().map_err(|e| self.io_err(key, e))?;
        if meta.is_dir() {
            return Err(ObjectError::NotFound(key.to_string()));
        }
        let mut buf = vec![0u8; STREAM_PIECE.min(meta.len().saturating_sub(off) as usize)];
        let mut pos = off;
        loop {
            match file.read_at(&mut buf, pos) {
                Ok(0) => break,
                Ok(n) => {
                    sink(&buf[..n]);
                    pos += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err(key, e)),
            }
            if buf.is_empty() {
                break;
            }
        }
        Ok(pos - off)
    }

    fn map(&self, key: &str, off: u64, len: u64) -> Option<Result<Bytes>> {
        Some((|| {
            let path = self.path_of(key)?;
            let file = File::open(&path).map_err(|e| self.io_err(key, e))?;
            let meta = file.metadata().map_err(|e| self.io_err(key, e))?;
            if meta.is_dir() {
                return Err(ObjectError::NotFound(key.to_string()));
            }
            let start = off.min(meta.len());
            let end = start.saturating_add(len).min(meta.len());
            Mapped::new(&file, start, (end - start) as usize)
                .map(Bytes::from_owner)
                .map_err(|e| self.io_err(key, e))
        })())
    }

    fn prefers_map(&self) -> bool {
        true
    }

    fn will_need(&self, key: &str) {
        self.advise(key, libc::POSIX_FADV_WILLNEED);
    }

    fn done_with(&self, key: &str) {
        self.advise(key, libc::POSIX_FADV_DONTNEED);
    }

    fn sync(&self, keys: &[String]) -> Result<()> {
        let mut dirs = std::collections::BTreeSet::new();
        for key in keys {
            let path = self.path_of(key)?;
            match File::open(&path).and_then(|f| f.sync_all()) {
                Ok(()) => {}
                // Deleted meanwhile (overwritten and collected): nothing to keep.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io_err(key, e)),
            }
            if let Some(d) = path.parent() {
                dirs.insert(d.to_path_buf());
            }
        }
        for d in dirs {
            File::open(&d)
                .and_then(|f| f.sync_all())
                .map_err(|e| self.io_err(&d.to_string_lossy(), e))?;
        }
        Ok(())
    }

    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path_of(key)?;
        self.write_atomic(&path, &data).map_err(|e| match e.kind() {
            // A missing directory here is not a missing object.
            ErrorKind::NotFound | ErrorKind::NotADirectory => {
                ObjectError::Other(format!("{} ({key}): {e}", self.describe()))
            }
            _ => self.io_err(key, e),
        })
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path_of(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {
                self.prune_dirs(&path);
                Ok(())
            }
            Err(e) => match self.io_err(key, e) {
                ObjectError::NotFound(_) => Ok(()),
                err => Err(err),
            },
        }
    }

    fn head(&self, key: &str) -> Result<ObjectInfo> {
        let path = self.path_of(key)?;
        let meta = fs::metadata(&path).map_err(|e| self.io_err(key, e))?;
        if meta.is_dir() {
            return Err(ObjectError::NotFound(key.to_string()));
        }
        Ok(ObjectInfo {
            key: key.to_string(),
            size: meta.len(),
            modified: mtime_secs(&meta),
        })
    }

    fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        if limit > 0 {
            self.walk(&self.root, "", prefix, start_after, limit, &mut out)
                .map_err(|e| self.io_err(prefix, e))?;
        }
        Ok(out)
    }
}

/// Modification time of a file, unix seconds.
fn mtime_secs(m: &fs::Metadata) -> Option<i64> {
    use std::os::unix::fs::MetadataExt;
    Some(m.mtime())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_root() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path().join("store"));
        (dir, store)
    }

    #[test]
    fn conformance() {
        let (_dir, store) = temp_root();
        crate::testing::object_conformance(&store, "conf/");
        crate::testing::object_conformance(&store, "");
    }

    #[test]
    fn map_returns_the_range_without_copying_and_errors_like_get() {
        let (_dir, store) = temp_root();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        store.put("m/k", Bytes::from(data.clone())).unwrap();
        // An offset that is not page aligned, a range past the end (shorter), empty ranges.
        let b = store.map("m/k", 5000, 10_000).unwrap().unwrap();
        assert_eq!(&b[..], &data[5000..15_000]);
        let b = store.map("m/k", 99_000, 10_000).unwrap().unwrap();
        assert_eq!(&b[..], &data[99_000..]);
        assert!(store.map("m/k", 200_000, 10).unwrap().unwrap().is_empty());
        assert!(store.map("m/k", 0, 0).unwrap().unwrap().is_empty());
        // Mapped bytes stay valid after the object is replaced or deleted.
        let held = store.map("m/k", 0, 100).unwrap().unwrap();
        store.put("m/k", Bytes::from(vec![1u8; 10])).unwrap();
        store.delete("m/k").unwrap();
        assert_eq!(&held[..], &data[..100]);
        assert!(matches!(
            store.map("m/k", 0, 10).unwrap(),
            Err(ObjectError::NotFound(_))
        ));
        assert!(matches!(
            store.map("../x", 0, 10).unwrap(),
            Err(ObjectError::Other(_))
        ));
        store.will_need("m/none"); // a hint: never fails
        store.done_with("m/none");
    }

    #[test]
    fn done_with_drops_an_object_from_the_page_cache() {
        let (_dir, store) = temp_root();
        store.init().unwrap();
        // Small enough to be written through the page cache.
        let data: Vec<u8> = (0..256u32 << 10).map(|i| (i % 249) as u8).collect();
        store.put("d/k", Bytes::from(data.clone())).unwrap();
        store.sync(&["d/k".to_string()]).unwrap(); // clean pages can be dropped
        assert_eq!(
            &store.map("d/k", 0, 1 << 20).unwrap().unwrap()[..],
            &data[..]
        );
        let path = store.root().join("d/k");
        if !store.direct.enabled() {
            eprintln!(
                "page-cache check skipped: {} is not ext4 or xfs",
                path.display()
            );
            return;
        }
        assert!(crate::directio::resident_pages(&path).iter().all(|r| *r));
        store.done_with("d/k");
        assert!(
            crate::directio::resident_pages(&path).iter().all(|r| !r),
            "no page of the object stays cached"
        );
        assert_eq!(&store.get("d/k", 0, None).unwrap()[..], &data[..]);
    }

    #[test]
    fn big_puts_skip_the_page_cache_where_the_file_system_allows_and_read_back_whole() {
        let (_dir, store) = temp_root();
        store.init().unwrap();
        // Three whole MiB and a tail that is not a whole page.
        let data: Vec<u8> = (0..(3 << 20) + 1234u32).map(|i| (i % 253) as u8).collect();
        store.put("big/k", Bytes::from(data.clone())).unwrap();
        if store.direct.enabled() {
            let pages = crate::directio::resident_pages(&store.root().join("big/k"));
            assert!(
                pages[..768].iter().all(|r| !r),
                "whole pages of a big put are not cached"
            );
        } else {
            eprintln!(
                "page-cache check skipped: {} refuses O_DIRECT",
                store.root().display()
            );
        }
        assert_eq!(&store.get("big/k", 0, None).unwrap()[..], &data[..]);
        let mapped = store.map("big/k", 5, 1 << 21).unwrap().unwrap();
        assert_eq!(&mapped[..], &data[5..5 + (1 << 21)]);
    }

    #[test]
    fn sync_flushes_stored_objects_and_skips_deleted_ones() {
        let (_dir, store) = temp_root();
        store.put("s/a", Bytes::from_static(b"a")).unwrap();
        store.put("s/b/c", Bytes::from_static(b"c")).unwrap();
        let keys = ["s/a", "s/b/c", "s/gone"].map(String::from);
        store.sync(&keys).unwrap();
        assert!(matches!(
            store.sync(&["../x".to_string()]),
            Err(ObjectError::Other(_))
        ));
    }

    #[test]
    fn rejects_escaping_keys() {
        let (_dir, store) = temp_root();
        for key in [
            "",
            "/abs",
            "a/../b",
            "..",
            "a//b",
            "a/",
            "./a",
            "x.strata-tmp-1",
        ] {
            let err = store.put(key, Bytes::from_static(b"x")).expect_err(key);
            assert!(matches!(err, ObjectError::Other(_)), "{key}: {err}");
        }
    }

    #[test]
    fn put_is_atomic_and_leaves_no_temp_files() {
        let (_dir, store) = temp_root();
        store.put("d/k", Bytes::from(vec![7u8; 100_000])).unwrap();
        store.put("d/k", Bytes::from(vec![8u8; 10])).unwrap();
        let names: Vec<_> = fs::read_dir(store.root().join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["k".to_string()]);
        assert_eq!(&store.get("d/k", 0, None).unwrap()[..], &[8u8; 10]);
    }

    #[test]
    fn as_root_new_files_and_directories_get_the_owner_of_the_store() {
        if euid_egid().0 != 0 {
            eprintln!("skipped: needs root to give files away");
            return;
        }
        let (_dir, store) = temp_root();
        fs::create_dir_all(store.root()).unwrap();
        std::os::unix::fs::chown(store.root(), Some(65532), Some(65533)).unwrap();
        store
            .put("vol/chunks/0/1", Bytes::from_static(b"x"))
            .unwrap();
        for p in ["vol", "vol/chunks", "vol/chunks/0", "vol/chunks/0/1"] {
            let m = fs::metadata(store.root().join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (65532, 65533), "{p}");
        }
        // A store owned by root keeps root's files.
        let (_dir2, mine) = temp_root();
        mine.put("a/b", Bytes::from_static(b"x")).unwrap();
        let m = fs::metadata(mine.root().join("a/b")).unwrap();
        assert_eq!(m.uid(), 0);
    }

    #[test]
    fn a_permission_error_names_the_path_and_the_users_not_the_keys() {
        let (_dir, store) = temp_root();
        fs::create_dir_all(store.root().join("vol")).unwrap();
        let e = store.io_err("vol/k", io::Error::from_raw_os_error(libc::EACCES));
        let text = e.to_string();
        let path = store.root().join("vol/k");
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("os error 13"), "{text}");
        assert!(text.contains("this process runs as uid"), "{text}");
        assert!(
            text.contains(&format!(
                "{} belongs to uid",
                store.root().join("vol").display()
            )),
            "{text}"
        );
        assert!(!text.contains("access key"), "{text}");
    }

    #[test]
    fn delete_prunes_empty_directories() {
        let (_dir, store) = temp_root();
        store.put("x/y/z", Bytes::from_static(b"1")).unwrap();
        store.delete("x/y/z").unwrap();
        assert!(!store.root().join("x").exists());
        assert!(store.root().exists());
    }

    #[test]
    fn list_orders_like_bytes_and_prunes() {
        let (_dir, store) = temp_root();
        let keys = ["a-b", "a/x", "a/y/1", "a0", "b/c"];
        for k in keys {
            store.put(k, Bytes::from_static(b"v")).unwrap();
        }
        let all: Vec<_> = store
            .list("", None, 100)
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        let mut sorted = keys.to_vec();
        sorted.sort();
        assert_eq!(all, sorted);
        let after: Vec<_> = store
            .list("a", Some("a/x"), 100)
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(after, vec!["a/y/1", "a0"]);
    }
}
