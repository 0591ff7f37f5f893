//! A directory of a Strata volume as a sync endpoint, opened through the library (metadata
//! engine + object store + a [`Vfs`] of its own, without FUSE): everything a POSIX tree has
//! (modes, owners, nanosecond times, extended attributes, symlinks, hard links). Files are
//! written through the VFS as `.strata-sync.NAME`, flushed and committed, given their
//! attributes, then renamed into place. Every metadata call made is counted.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;

use super::endpoint::{
    Caps, Counters, Endpoint, Item, Kind, Reader, Writer, copied_xattr, join, split, temp_name,
};
use super::{Result, SyncError};
use crate::meta::{
    Ctx, FileKind, Ino, MetaError, MetaSettings, Node, ROOT_INO, SetAttr, TimeSet, redact_url,
};
use crate::metrics::Metrics;
use crate::object::RetrySettings;
use crate::vfs::{Vfs, VfsError, VfsSettings};

/// Bytes asked of one VFS read.
const PIECE: u32 = 4 << 20;
/// Most changed directories a `--since` pass visits one by one (more: a full pass).
const JOURNAL_LIMIT: usize = 1_000_000;
/// Entries asked of one metadata readdir.
const PAGE: usize = 10_000;

pub struct VolumeDir {
    vfs: Arc<Vfs>,
    root: Ino,
    url: String,
    counters: Counters,
    /// Directory path → inode, as resolved or created by this run.
    dirs: Mutex<HashMap<String, Ino>>,
    finished: AtomicBool,
}

fn kind_of(k: FileKind) -> Kind {
    match k {
        FileKind::File => Kind::File,
        FileKind::Dir => Kind::Dir,
        FileKind::Symlink => Kind::Symlink,
        _ => Kind::Other,
    }
}

fn item_of(name: String, n: &Node) -> Item {
    let kind = kind_of(n.kind);
    Item {
        name,
        kind,
        size: if kind == Kind::Dir { 0 } else { n.length },
        mtime: n.mtime,
        atime: n.atime,
        mode: n.mode & 0o7777,
        uid: n.uid,
        gid: n.gid,
        nlink: n.nlink,
        id: n.ino,
    }
}

fn set_of(item: &Item, mode: bool) -> SetAttr {
    SetAttr {
        mode: mode.then_some(item.mode & 0o7777),
        uid: Some(item.uid),
        gid: Some(item.gid),
        atime: Some(TimeSet::At(item.atime)),
        mtime: Some(TimeSet::At(item.mtime)),
    }
}

impl VolumeDir {
    /// Open the volume at `meta_url` and its directory `path` (created for a destination).
    pub fn open(
        meta_url: &str,
        path: &str,
        read_only: bool,
        metrics: Arc<Metrics>,
    ) -> Result<VolumeDir> {
        let vol = crate::volume::open(
            meta_url,
            metrics.clone(),
            MetaSettings::default(),
            RetrySettings::default(),
            read_only,
        )?;
        let settings = VfsSettings {
            read_only,
            background_gc: false,
            ..VfsSettings::default()
        };
        let vfs = Vfs::try_new(
            vol.meta.clone(),
            vol.store.clone(),
            vol.format.clone(),
            metrics,
            settings,
        )
        .map_err(|e| SyncError::Io(format!("{}: {e}", redact_url(meta_url))))?;
        vol.meta
            .new_session(&vfs.session_info())
            .map_err(SyncError::from_meta(meta_url))?;
        vfs.start_background();
        let url = format!(
            "{} (volume {}) {}",
            redact_url(meta_url),
            vol.format.name,
            {
                let p = path.trim_matches('/');
                format!("/{p}")
            }
        );
        let mut d = VolumeDir {
            vfs,
            root: ROOT_INO,
            url,
            counters: Counters::default(),
            dirs: Mutex::new(HashMap::new()),
            finished: AtomicBool::new(false),
        };
        let mut ino = ROOT_INO;
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            if part == ".." {
                d.finish()?;
                return Err(SyncError::Invalid(format!(
                    "{path}: '..' is not allowed in --src-path/--dst-path"
                )));
            }
            d.counters.meta(1);
            ino = match d.vfs.lookup(ino, part.as_bytes()) {
                Ok(n) if n.kind == FileKind::Dir => n.ino,
                Ok(_) => {
                    d.finish()?;
                    return Err(SyncError::Invalid(format!(
                        "{}: {part} in {path} is not a directory",
                        d.url
                    )));
                }
                Err(VfsError::Meta(MetaError::NotFound)) if !read_only => {
                    d.counters.meta(1);
                    let n = d
                        .vfs
                        .mknod(Ctx::ROOT, ino, part.as_bytes(), FileKind::Dir, 0o755, 0)
                        .map_err(|e| d.err(path, e))?;
                    n.ino
                }
                Err(VfsError::Meta(MetaError::NotFound)) => {
                    d.finish()?;
                    return Err(SyncError::Invalid(format!(
                        "{}: {path} does not exist in the volume (check --src-path)",
                        d.url
                    )));
                }
                Err(e) => {
                    let err = d.err(path, e);
                    d.finish()?;
                    return Err(err);
                }
            };
        }
        d.root = ino;
        Ok(d)
    }

    /// The volume's VFS (tests compare trees through it).
    pub fn vfs(&self) -> &Arc<Vfs> {
        &self.vfs
    }

    fn err(&self, path: &str, e: impl std::fmt::Display) -> SyncError {
        SyncError::Io(format!("{}: /{path}: {e}", self.url))
    }

    /// The inode of directory `path` (cached).
    fn dir_ino(&self, path: &str) -> Result<Ino> {
        self.find_dir(path)?
            .ok_or_else(|| self.err(path, "no such directory"))
    }

    /// The inode of directory `path`, `None` when there is none.
    fn find_dir(&self, path: &str) -> Result<Option<Ino>> {
        if path.is_empty() {
            return Ok(Some(self.root));
        }
        if let Some(i) = self.dirs.lock().get(path) {
            return Ok(Some(*i));
        }
        let (parent, name) = split(path);
        let Some(p) = self.find_dir(parent)? else {
            return Ok(None);
        };
        self.counters.meta(1);
        match self.vfs.lookup(p, name.as_bytes()) {
            Ok(n) if n.kind == FileKind::Dir => {
                self.dirs.lock().insert(path.to_string(), n.ino);
                Ok(Some(n.ino))
            }
            Ok(_) | Err(VfsError::Meta(MetaError::NotFound)) => Ok(None),
            Err(e) => Err(self.err(path, e)),
        }
    }

    /// The node at `path`, if any.
    fn node(&self, path: &str) -> Result<Option<Node>> {
        if path.is_empty() {
            self.counters.meta(1);
            return self
                .vfs
                .getattr(self.root)
                .map(Some)
                .map_err(|e| self.err(path, e));
        }
        let (parent, name) = split(path);
        let Some(p) = self.find_dir(parent)? else {
            return Ok(None);
        };
        self.counters.meta(1);
        match self.vfs.lookup(p, name.as_bytes()) {
            Ok(n) => Ok(Some(n)),
            Err(VfsError::Meta(MetaError::NotFound)) => Ok(None),
            Err(e) => Err(self.err(path, e)),
        }
    }

    fn entries(&self, ino: Ino) -> std::result::Result<Vec<crate::meta::Entry>, VfsError> {
        let mut out = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            self.counters.meta(1);
            let page = self.vfs.meta.readdir(ino, after.as_deref(), PAGE)?;
            let n = page.len();
            after = page.last().map(|e| e.name.clone());
            out.extend(page);
            if n < PAGE {
                return Ok(out);
            }
        }
    }

    /// Remove the entry `name` of directory `parent` (a directory with its whole tree).
    fn remove_entry(&self, parent: Ino, name: &[u8], path: &str) -> Result<()> {
        self.counters.meta(1);
        let n = match self.vfs.lookup(parent, name) {
            Ok(n) => n,
            Err(VfsError::Meta(MetaError::NotFound)) => return Ok(()),
            Err(e) => return Err(self.err(path, e)),
        };
        if n.kind == FileKind::Dir {
            let prefix = format!("{path}/");
            self.dirs
                .lock()
                .retain(|k, _| k != path && !k.starts_with(&prefix));
            for e in self.entries(n.ino).map_err(|e| self.err(path, e))? {
                let child = join(path, &String::from_utf8_lossy(&e.name));
                self.remove_entry(n.ino, &e.name, &child)?;
            }
            self.counters.meta(1);
            self.vfs
                .rmdir(parent, name)
                .map_err(|e| self.err(path, e))?;
        } else {
            self.counters.meta(1);
            self.vfs
                .unlink(parent, name)
                .map_err(|e| self.err(path, e))?;
        }
        Ok(())
    }

    fn set_xattrs_ino(&self, ino: Ino, path: &str, want: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        let have = self.xattrs_ino(ino, path)?;
        for (name, _) in &have {
            if !want.iter().any(|(n, _)| n == name) {
                self.counters.meta(1);
                self.vfs
                    .removexattr(ino, name)
                    .map_err(|e| self.err(path, e))?;
            }
        }
        for (name, value) in want {
            if have.iter().any(|(n, v)| n == name && v == value) {
                continue;
            }
            self.counters.meta(1);
            self.vfs
                .setxattr(ino, name, value, 0)
                .map_err(|e| self.err(path, e))?;
        }
        Ok(())
    }

    fn xattrs_ino(&self, ino: Ino, path: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.counters.meta(1);
        let names = self.vfs.listxattr(ino).map_err(|e| self.err(path, e))?;
        let mut out = Vec::new();
        for name in names.into_iter().filter(|n| copied_xattr(n)) {
            self.counters.meta(1);
            match self.vfs.getxattr(ino, &name) {
                Ok(v) => out.push((name, v)),
                Err(VfsError::Meta(MetaError::NoAttr)) => {}
                Err(e) => return Err(self.err(path, e)),
            }
        }
        out.sort();
        Ok(out)
    }

    /// Create `tmp` in `parent` for writing, replacing a leftover of a killed run.
    fn create_tmp(&self, parent: Ino, tmp: &str, path: &str) -> Result<(Node, u64)> {
        for _ in 0..2 {
            self.counters.meta(1);
            match self.vfs.create(Ctx::ROOT, parent, tmp.as_bytes(), 0o600) {
                Ok(r) => return Ok(r),
                Err(VfsError::Meta(MetaError::Exists)) => {
                    let (d, _) = split(path);
                    self.remove_entry(parent, tmp.as_bytes(), &join(d, tmp))?;
                }
                Err(e) => return Err(self.err(path, e)),
            }
        }
        Err(self.err(path, "the temporary file keeps coming back"))
    }

    /// Directory inode (if the directory still exists) and path of inode `ino`, relative
    /// to the root; `None` when it is gone or outside the root. `names` caches directory
    /// listings made to find names (inode → (parent, name)).
    fn path_of(&self, ino: Ino, names: &mut HashMap<Ino, (Ino, String)>) -> Result<Option<String>> {
        let mut parts = Vec::new();
        let mut cur = ino;
        for _ in 0..4096 {
            if cur == self.root {
                parts.reverse();
                return Ok(Some(parts.join("/")));
            }
            if cur == ROOT_INO {
                return Ok(None);
            }
            if let Some((p, n)) = names.get(&cur) {
                parts.push(n.clone());
                cur = *p;
                continue;
            }
            self.counters.meta(1);
            let node = match self.vfs.meta.getattr(cur) {
                Ok(n) => n,
                Err(MetaError::NotFound) => return Ok(None),
                Err(e) => return Err(self.err(&format!("<inode {cur}>"), e)),
            };
            if node.kind != FileKind::Dir || node.parent == 0 {
                return Ok(None);
            }
            self.counters.path_lists.fetch_add(1, Ordering::Relaxed);
            let entries = match self.entries(node.parent) {
                Ok(e) => e,
                Err(VfsError::Meta(MetaError::NotFound)) => return Ok(None),
                Err(e) => return Err(self.err(&format!("<inode {}>", node.parent), e)),
            };
            for e in entries.into_iter().filter(|e| e.kind == FileKind::Dir) {
                if let Ok(name) = String::from_utf8(e.name) {
                    names.insert(e.ino, (node.parent, name));
                }
            }
            if !names.contains_key(&cur) {
                return Ok(None);
            }
        }
        Ok(None)
    }
}

impl Drop for VolumeDir {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

struct VolReader {
    vfs: Arc<Vfs>,
    ino: Ino,
    fh: u64,
    off: u64,
    size: u64,
    url: String,
    path: String,
}

impl Reader for VolReader {
    fn next(&mut self) -> Result<Option<Bytes>> {
        if self.off >= self.size {
            return Ok(None);
        }
        let want = (self.size - self.off).min(PIECE as u64) as u32;
        let b = self
            .vfs
            .read(self.ino, self.fh, self.off, want)
            .map_err(|e| SyncError::Io(format!("{}: /{}: {e}", self.url, self.path)))?;
        if b.is_empty() {
            return Err(SyncError::Io(format!(
                "{}: /{}: ended at {} bytes, listed with {} (changed while copied; run the sync again)",
                self.url, self.path, self.off, self.size
            )));
        }
        self.off += b.len() as u64;
        Ok(Some(b))
    }
}

impl Drop for VolReader {
    fn drop(&mut self) {
        let _ = self.vfs.release(self.ino, self.fh, None);
    }
}

struct VolWriter<'a> {
    dir: &'a VolumeDir,
    parent: Ino,
    ino: Ino,
    fh: u64,
    off: u64,
    tmp: String,
    path: String,
    open: bool,
}

impl VolWriter<'_> {
    fn close(&mut self) -> Result<()> {
        if !self.open {
            return Ok(());
        }
        self.open = false;
        let flushed = self.dir.vfs.flush_inode(self.ino);
        let released = self.dir.vfs.release(self.ino, self.fh, None);
        flushed
            .and(released)
            .map_err(|e| self.dir.err(&self.path, e))
    }
}

impl Writer for VolWriter<'_> {
    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.dir
            .vfs
            .write(self.ino, self.off, data)
            .map_err(|e| self.dir.err(&self.path, e))?;
        self.off += data.len() as u64;
        Ok(())
    }

    fn commit(mut self: Box<Self>, item: &Item, xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        let res = (|| {
            self.close()?;
            if !xattrs.is_empty() {
                self.dir.set_xattrs_ino(self.ino, &self.path, xattrs)?;
            }
            self.dir.counters.meta(1);
            self.dir
                .vfs
                .setattr(self.ino, &set_of(item, true), None)
                .map_err(|e| self.dir.err(&self.path, e))?;
            // A directory of this name was removed before the copy started (see sync_entry).
            let (_, name) = split(&self.path);
            self.dir.counters.meta(1);
            self.dir
                .vfs
                .rename(
                    self.parent,
                    self.tmp.as_bytes(),
                    self.parent,
                    name.as_bytes(),
                    0,
                )
                .map_err(|e| self.dir.err(&self.path, e))
        })();
        if res.is_err() {
            self.abort_inner();
        }
        res
    }

    fn abort(mut self: Box<Self>) {
        self.abort_inner();
    }
}

impl VolWriter<'_> {
    fn abort_inner(&mut self) {
        let _ = self.close();
        self.dir.counters.meta(1);
        let _ = self.dir.vfs.unlink(self.parent, self.tmp.as_bytes());
    }
}

impl Endpoint for VolumeDir {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn caps(&self) -> Caps {
        Caps {
            attrs: true,
            xattrs: true,
            symlinks: true,
            hardlinks: true,
            dirs: true,
        }
    }

    fn counters(&self) -> &Counters {
        &self.counters
    }

    fn stat(&self, path: &str) -> Result<Option<Item>> {
        Ok(self
            .node(path)?
            .map(|n| item_of(split(path).1.to_string(), &n)))
    }

    fn list(&self, dir: &str) -> Result<Option<Vec<Item>>> {
        let Some(ino) = self.find_dir(dir)? else {
            return Ok(None);
        };
        self.counters.list();
        let entries = match self.entries(ino) {
            Ok(e) => e,
            Err(VfsError::Meta(MetaError::NotFound)) => return Ok(None),
            Err(e) => return Err(self.err(dir, e)),
        };
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let Ok(name) = String::from_utf8(e.name.clone()) else {
                return Err(SyncError::Invalid(format!(
                    "{}: /{dir}: the name {:?} is not UTF-8 (rename it; sync copies UTF-8 names only)",
                    self.url,
                    String::from_utf8_lossy(&e.name)
                )));
            };
            self.counters.meta(1);
            match self.vfs.meta.getattr(e.ino) {
                Ok(n) => {
                    if n.kind == FileKind::Dir {
                        self.dirs.lock().insert(join(dir, &name), n.ino);
                    }
                    out.push(item_of(name, &n));
                }
                Err(MetaError::NotFound) => {}
                Err(err) => return Err(self.err(&join(dir, &name), err)),
            }
        }
        Ok(Some(out))
    }

    fn open(&self, path: &str, item: &Item) -> Result<Box<dyn Reader>> {
        let ino = if item.id != 0 {
            item.id
        } else {
            self.node(path)?
                .ok_or_else(|| self.err(path, "no such file (removed since it was listed)"))?
                .ino
        };
        self.counters.meta(1);
        let (fh, _) = self.vfs.open(ino, false).map_err(|e| self.err(path, e))?;
        Ok(Box::new(VolReader {
            vfs: self.vfs.clone(),
            ino,
            fh,
            off: 0,
            size: item.size,
            url: self.url.clone(),
            path: path.to_string(),
        }))
    }

    fn create(&self, path: &str, _item: &Item) -> Result<Box<dyn Writer + '_>> {
        let (dir, name) = split(path);
        let parent = self.dir_ino(dir)?;
        let tmp = temp_name(name);
        let (n, fh) = self.create_tmp(parent, &tmp, path)?;
        Ok(Box::new(VolWriter {
            dir: self,
            parent,
            ino: n.ino,
            fh,
            off: 0,
            tmp,
            path: path.to_string(),
            open: true,
        }))
    }

    fn mkdir(&self, path: &str, item: &Item) -> Result<()> {
        if path.is_empty() {
            return Ok(());
        }
        let (dir, name) = split(path);
        let parent = self.dir_ino(dir)?;
        self.counters.meta(1);
        match self.vfs.mknod(
            Ctx::ROOT,
            parent,
            name.as_bytes(),
            FileKind::Dir,
            item.mode | 0o700,
            0,
        ) {
            Ok(n) => {
                self.dirs.lock().insert(path.to_string(), n.ino);
                Ok(())
            }
            Err(VfsError::Meta(MetaError::Exists)) => Ok(()),
            Err(e) => Err(self.err(path, e)),
        }
    }

    fn set_attrs(&self, path: &str, item: &Item) -> Result<()> {
        let n = self
            .node(path)?
            .ok_or_else(|| self.err(path, "no such file or directory"))?;
        self.counters.meta(1);
        self.vfs
            .setattr(n.ino, &set_of(item, n.kind != FileKind::Symlink), None)
            .map(|_| ())
            .map_err(|e| self.err(path, e))
    }

    fn readlink(&self, path: &str) -> Result<Vec<u8>> {
        let n = self
            .node(path)?
            .ok_or_else(|| self.err(path, "no such file or directory"))?;
        self.counters.meta(1);
        self.vfs.readlink(n.ino).map_err(|e| self.err(path, e))
    }

    fn symlink(&self, path: &str, target: &[u8], item: &Item) -> Result<()> {
        let (dir, name) = split(path);
        let parent = self.dir_ino(dir)?;
        let tmp = temp_name(name);
        self.remove_entry(parent, tmp.as_bytes(), &join(dir, &tmp))?;
        self.counters.meta(1);
        let n = self
            .vfs
            .symlink(Ctx::ROOT, parent, tmp.as_bytes(), target)
            .map_err(|e| self.err(path, e))?;
        self.counters.meta(1);
        self.vfs
            .setattr(n.ino, &set_of(item, false), None)
            .map_err(|e| self.err(path, e))?;
        self.counters.meta(1);
        self.vfs
            .rename(parent, tmp.as_bytes(), parent, name.as_bytes(), 0)
            .map_err(|e| self.err(path, e))
    }

    fn link(&self, existing: &str, path: &str) -> Result<()> {
        let target = self
            .node(existing)?
            .ok_or_else(|| self.err(existing, "no such file (the first link was not copied)"))?;
        let (dir, name) = split(path);
        let parent = self.dir_ino(dir)?;
        self.remove_entry(parent, name.as_bytes(), path)?;
        self.counters.meta(1);
        self.vfs
            .link(target.ino, parent, name.as_bytes())
            .map(|_| ())
            .map_err(|e| self.err(path, e))
    }

    fn remove(&self, path: &str, _kind: Kind) -> Result<()> {
        let (dir, name) = split(path);
        let parent = self.dir_ino(dir)?;
        self.remove_entry(parent, name.as_bytes(), path)
    }

    fn xattrs(&self, path: &str, listed: Option<&Item>) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let ino = match listed.filter(|i| i.id != 0) {
            Some(i) => i.id,
            None => {
                self.node(path)?
                    .ok_or_else(|| self.err(path, "no such file or directory"))?
                    .ino
            }
        };
        self.xattrs_ino(ino, path)
    }

    fn set_xattrs(&self, path: &str, want: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        let n = self
            .node(path)?
            .ok_or_else(|| self.err(path, "no such file or directory"))?;
        self.set_xattrs_ino(n.ino, path, want)
    }

    fn change_token(&self) -> Result<Option<String>> {
        self.counters.meta(1);
        self.vfs
            .meta
            .change_token()
            .map(Some)
            .map_err(|e| self.err("", e))
    }

    fn changed_dirs(&self, token: &str) -> Result<std::result::Result<Vec<String>, String>> {
        self.counters.meta(1);
        let batch = match self.vfs.meta.changes_since(token, JOURNAL_LIMIT) {
            Ok(b) => b,
            Err(MetaError::JournalTrimmed(why)) => return Ok(Err(why)),
            Err(e) => return Err(self.err("", e)),
        };
        if !batch.linked_files.is_empty() {
            return Ok(Err(format!(
                "{} changed files have several links (the journal does not know their directories)",
                batch.linked_files.len()
            )));
        }
        let mut names = HashMap::new();
        let mut out = Vec::new();
        for ino in batch.dirs {
            if let Some(p) = self.path_of(ino, &mut names)? {
                out.push(p);
            }
        }
        out.sort();
        out.dedup();
        Ok(Ok(out))
    }

    fn finish(&self) -> Result<()> {
        if !self.finished.swap(true, Ordering::SeqCst) {
            self.vfs.shutdown();
        }
        Ok(())
    }
}
