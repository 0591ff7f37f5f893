//! Attached sources in the metadata (docs/FORMAT.md, "Attached sources"): the attachment
//! records, and the listings of a source imported into the tree, one directory at a time, on
//! first access and again when they are stale. Imported files and directories carry the
//! attachment id in `rdev` (so every client tells them apart from the node alone, at no extra
//! cost) and their source in a reserved extended attribute that users can neither see nor
//! set. They are read-only ([`super::check_not_source`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::fs::{Meta, check_name, get_dir};
use super::{Entry, FileKind, Ino, MetaError, Node, Result, Txn, now_ns};
use crate::source::{Attachment, Listing, SourceObject};

/// Extended attributes whose names start with this are Strata's own: hidden from
/// `listxattr`/`getxattr`, refused by `setxattr`/`removexattr`.
pub const RESERVED_XATTR_PREFIX: &[u8] = b"strata.";
/// On an imported file: its object ([`ExtFile`] as JSON).
const FILE_XATTR: &[u8] = b"strata.source";
/// On an imported directory and the directory a source is attached to ([`DirState`]).
const DIR_XATTR: &[u8] = b"strata.source.dir";
/// Counter handing out attachment ids.
const ATTACH_COUNTER: &str = "attach_ids";

fn setting_name(id: u32) -> String {
    format!("attach/{id}")
}

/// The object behind an imported file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtFile {
    pub attach: u32,
    /// Key relative to the source's prefix.
    pub key: String,
    pub etag: String,
    pub size: u64,
}

/// The import state of a directory of a source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirState {
    pub attach: u32,
    /// The directory's prefix relative to the source's (empty for the attached directory,
    /// else ending with `/`).
    pub prefix: String,
    /// When its listing was last imported (unix seconds; 0 = never).
    pub listed: i64,
    /// Digest of the last imported listing (names, sizes, ETags): an unchanged listing
    /// writes nothing but `listed`.
    pub digest: String,
}

/// What an import changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportStats {
    pub added: u64,
    pub updated: u64,
    pub removed: u64,
    /// The listing was the same as last time.
    pub unchanged: bool,
}

enum Want<'a> {
    File(&'a SourceObject),
    /// A sub-prefix (relative to the source's prefix, ending with `/`).
    Dir(&'a str),
}

/// FNV-1a 64: a stable digest of a listing (change detection only).
fn digest(want: &BTreeMap<Vec<u8>, Want<'_>>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for x in b {
            h ^= u64::from(*x);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (name, w) in want {
        eat(name);
        match w {
            Want::File(o) => {
                eat(b"\0f");
                eat(o.etag.as_bytes());
                eat(&o.size.to_le_bytes());
                eat(&o.mtime_ns.to_le_bytes());
            }
            Want::Dir(_) => eat(b"\0d"),
        }
        eat(b"\n");
    }
    format!("{h:016x}")
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn all_edges(tx: &mut dyn Txn, dir: Ino) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    loop {
        let after = out.last().map(|e: &Entry| e.name.clone());
        let page = tx.list_edges(dir, after.as_deref(), 10_000)?;
        let n = page.len();
        out.extend(page);
        if n < 10_000 {
            return Ok(out);
        }
    }
}

/// Remove entry `e` of `dir` and, for a directory, everything below it (imported nodes own
/// no data: nothing to reclaim). Returns the inodes removed.
fn remove_tree(tx: &mut dyn Txn, dir: Ino, e: &Entry) -> Result<i64> {
    tx.delete_edge(dir, &e.name)?;
    let mut removed = 0;
    let mut stack = vec![(e.ino, e.kind)];
    while let Some((ino, kind)) = stack.pop() {
        if kind == FileKind::Dir {
            for c in all_edges(tx, ino)? {
                tx.delete_edge(ino, &c.name)?;
                stack.push((c.ino, c.kind));
            }
        }
        if tx.get_node(ino)?.is_some() {
            tx.delete_node(ino)?;
            tx.delete_xattrs(ino)?;
            removed += 1;
        }
    }
    Ok(removed)
}

impl Meta {
    /// Every attachment of the volume.
    pub fn attachments(&self) -> Result<Vec<Attachment>> {
        self.txn(false, |tx| {
            let max = tx.get_counter(ATTACH_COUNTER)?;
            let mut out = Vec::new();
            for id in 1..=max.max(0) as u32 {
                if let Some(v) = tx.get_setting(&setting_name(id))?
                    && !v.is_empty()
                {
                    out.push(serde_json::from_str(&v).map_err(|e| {
                        MetaError::Format(format!("attachment {id} is unreadable: {e}"))
                    })?);
                }
            }
            Ok(out)
        })
    }

    pub fn attachment(&self, id: u32) -> Result<Option<Attachment>> {
        self.txn(false, |tx| {
            tx.get_setting(&setting_name(id))?
                .filter(|v| !v.is_empty())
                .map(|v| {
                    serde_json::from_str(&v).map_err(|e| {
                        MetaError::Format(format!("attachment {id} is unreadable: {e}"))
                    })
                })
                .transpose()
        })
    }

    /// Create directory `name` in `parent` and attach `a`'s source to it (`a.id` and `a.ino`
    /// are filled in). Its listing is imported on first access.
    pub fn attach(&self, parent: Ino, name: &[u8], mut a: Attachment) -> Result<Attachment> {
        check_name(name)?;
        let ino = self.new_inode()?;
        self.txn(true, |tx| {
            let mut p = get_dir(tx, parent)?;
            super::check_not_source(&p)?;
            if tx.get_edge(parent, name)?.is_some() {
                return Err(MetaError::Exists);
            }
            let id = tx.incr_counter(ATTACH_COUNTER, 1)? as u32;
            a.id = id;
            a.ino = ino;
            let now = now_ns();
            let node = source_node(ino, FileKind::Dir, id, parent, 4096, now, now);
            tx.put_node(&node)?;
            tx.put_edge(
                parent,
                &Entry {
                    name: name.to_vec(),
                    ino,
                    kind: FileKind::Dir,
                },
            )?;
            tx.put_xattr(
                ino,
                DIR_XATTR,
                &json(&DirState {
                    attach: id,
                    prefix: String::new(),
                    listed: 0,
                    digest: String::new(),
                }),
            )?;
            p.nlink += 1;
            p.mtime = now;
            p.ctime = now;
            tx.put_node(&p)?;
            let text = serde_json::to_string(&a)
                .map_err(|e| MetaError::Format(format!("attachment: {e}")))?;
            tx.set_setting(&setting_name(id), &text)?;
            Self::account(tx, 0, 1)?;
            Ok(a.clone())
        })
    }

    /// Remove attachment `id`: its directory and everything imported below it. Returns the
    /// inodes removed.
    pub fn detach(&self, id: u32) -> Result<u64> {
        let a = self
            .attachment(id)?
            .ok_or(MetaError::Invalid("no such attachment"))?;
        self.txn(true, |tx| {
            let mut removed = 0;
            if let Some(n) = tx.get_node(a.ino)?
                && n.rdev == id
            {
                let mut p = get_dir(tx, n.parent)?;
                let name = all_edges(tx, n.parent)?
                    .into_iter()
                    .find(|e| e.ino == a.ino)
                    .map(|e| e.name);
                if let Some(name) = name {
                    removed = remove_tree(
                        tx,
                        n.parent,
                        &Entry {
                            name,
                            ino: a.ino,
                            kind: FileKind::Dir,
                        },
                    )?;
                    p.nlink = p.nlink.saturating_sub(1);
                    p.mtime = now_ns();
                    p.ctime = p.mtime;
                    tx.put_node(&p)?;
                }
            }
            tx.set_setting(&setting_name(id), "")?;
            Self::account(tx, 0, -removed)?;
            Ok(removed as u64)
        })
    }

    /// The object behind an imported file (`None` for any other inode).
    pub fn ext_file(&self, ino: Ino) -> Result<Option<ExtFile>> {
        self.read_one(|tx| tx.get_xattr(ino, FILE_XATTR))?
            .map(|v| {
                serde_json::from_slice(&v)
                    .map_err(|e| MetaError::Format(format!("source of inode {ino}: {e}")))
            })
            .transpose()
    }

    /// The import state of a directory of a source (`None` for any other directory).
    pub fn dir_state(&self, ino: Ino) -> Result<Option<DirState>> {
        self.read_one(|tx| tx.get_xattr(ino, DIR_XATTR))?
            .map(|v| {
                serde_json::from_slice(&v)
                    .map_err(|e| MetaError::Format(format!("source of directory {ino}: {e}")))
            })
            .transpose()
    }

    /// The directories of attachment `id` whose listing was imported at least once (the
    /// attached directory first), with their prefixes: what `strata attach --sync` lists
    /// again.
    pub fn imported_dirs(&self, id: u32) -> Result<Vec<(Ino, DirState)>> {
        let a = self
            .attachment(id)?
            .ok_or(MetaError::Invalid("no such attachment"))?;
        let mut out = Vec::new();
        let mut queue = std::collections::VecDeque::from([a.ino]);
        while let Some(dir) = queue.pop_front() {
            let Some(state) = self.dir_state(dir)? else {
                continue;
            };
            if state.listed == 0 {
                continue;
            }
            let subdirs: Vec<Ino> = self.txn(false, |tx| {
                Ok(all_edges(tx, dir)?
                    .into_iter()
                    .filter(|e| e.kind == FileKind::Dir)
                    .map(|e| e.ino)
                    .collect())
            })?;
            queue.extend(subdirs);
            out.push((dir, state));
        }
        Ok(out)
    }

    /// Bring directory `dir` of a source in line with `listing` (one level of the source
    /// below the directory's prefix): entries added, changed (ETag or size) and removed in
    /// one transaction. Names a POSIX directory cannot hold (empty, too long, or an object
    /// and a prefix of the same name: the directory wins) are left out.
    pub fn import_listing(&self, dir: Ino, listing: &Listing) -> Result<ImportStats> {
        let state = self
            .dir_state(dir)?
            .ok_or(MetaError::Invalid("not a directory of an attached source"))?;
        let mut want: BTreeMap<Vec<u8>, Want<'_>> = BTreeMap::new();
        for p in &listing.prefixes {
            let Some(name) = p.strip_prefix(&state.prefix) else {
                continue;
            };
            let name = name.trim_end_matches('/');
            if check_name(name.as_bytes()).is_ok() && name != "." && name != ".." {
                want.insert(name.as_bytes().to_vec(), Want::Dir(p));
            }
        }
        for o in &listing.objects {
            let Some(name) = o.key.strip_prefix(&state.prefix) else {
                continue;
            };
            if check_name(name.as_bytes()).is_ok()
                && name != "."
                && name != ".."
                && !want.contains_key(name.as_bytes())
            {
                want.insert(name.as_bytes().to_vec(), Want::File(o));
            }
        }
        let digest = digest(&want);
        let now_s = now_ns() / 1_000_000_000;
        if digest == state.digest {
            self.txn(true, |tx| {
                let s = DirState {
                    listed: now_s,
                    ..state.clone()
                };
                tx.put_xattr(dir, DIR_XATTR, &json(&s))
            })?;
            return Ok(ImportStats {
                unchanged: true,
                ..Default::default()
            });
        }
        // Inode numbers for new entries are taken before the transaction (taking them is a
        // transaction of its own); a transaction that needs more asks for them and runs again.
        let existing: std::collections::HashSet<Vec<u8>> = self.txn(false, |tx| {
            Ok(all_edges(tx, dir)?.into_iter().map(|e| e.name).collect())
        })?;
        let mut need = want.keys().filter(|k| !existing.contains(*k)).count() + 8;
        loop {
            let inos = (0..need)
                .map(|_| self.new_inode())
                .collect::<Result<Vec<_>>>()?;
            let res = self.txn(true, |tx| self.apply_import(tx, dir, &state, &want, &inos))?;
            match res {
                Ok(mut stats) => {
                    let s = DirState {
                        listed: now_s,
                        digest: digest.clone(),
                        ..state.clone()
                    };
                    self.txn(true, |tx| tx.put_xattr(dir, DIR_XATTR, &json(&s)))?;
                    stats.unchanged = false;
                    return Ok(stats);
                }
                Err(more) => need = more,
            }
        }
    }

    /// The import transaction; `Ok(Err(n))`: `inos` are too few, `n` are needed.
    fn apply_import(
        &self,
        tx: &mut dyn Txn,
        dir: Ino,
        state: &DirState,
        want: &BTreeMap<Vec<u8>, Want<'_>>,
        inos: &[Ino],
    ) -> Result<std::result::Result<ImportStats, usize>> {
        let mut d = get_dir(tx, dir)?;
        let mut edges: BTreeMap<Vec<u8>, Entry> = all_edges(tx, dir)?
            .into_iter()
            .map(|e| (e.name.clone(), e))
            .collect();
        let new = want
            .iter()
            .filter(|(name, w)| match (edges.get(*name), w) {
                (Some(e), Want::File(_)) => e.kind != FileKind::File,
                (Some(e), Want::Dir(_)) => e.kind != FileKind::Dir,
                (None, _) => true,
            })
            .count();
        if new > inos.len() {
            return Ok(Err(new + 8));
        }
        let mut free = inos.iter();
        let mut stats = ImportStats::default();
        let (mut inodes, mut dirs) = (0i64, 0i64);
        let now = now_ns();
        for (name, w) in want {
            let old = edges.remove(name);
            match (&old, w) {
                (Some(e), Want::File(o)) if e.kind == FileKind::File => {
                    let ext = tx
                        .get_xattr(e.ino, FILE_XATTR)?
                        .and_then(|v| serde_json::from_slice::<ExtFile>(&v).ok());
                    if let Some(mut n) = tx.get_node(e.ino)?
                        && (ext.as_ref().is_none_or(|x| x.etag != o.etag) || n.length != o.size)
                    {
                        n.length = o.size;
                        n.mtime = o.mtime_ns;
                        n.ctime = now;
                        tx.put_node(&n)?;
                        tx.put_xattr(e.ino, FILE_XATTR, &json(&ext_of(state, o)))?;
                        stats.updated += 1;
                    }
                    continue;
                }
                (Some(e), Want::Dir(_)) if e.kind == FileKind::Dir => continue,
                (Some(e), _) => {
                    if e.kind == FileKind::Dir {
                        dirs -= 1;
                    }
                    inodes -= remove_tree(tx, dir, e)?;
                    stats.removed += 1;
                }
                (None, _) => {}
            }
            let Some(&ino) = free.next() else {
                return Ok(Err(new + 8));
            };
            let (kind, node) = match w {
                Want::File(o) => (
                    FileKind::File,
                    source_node(
                        ino,
                        FileKind::File,
                        state.attach,
                        dir,
                        o.size,
                        o.mtime_ns,
                        now,
                    ),
                ),
                Want::Dir(_) => (
                    FileKind::Dir,
                    source_node(ino, FileKind::Dir, state.attach, dir, 4096, now, now),
                ),
            };
            tx.put_node(&node)?;
            tx.put_edge(
                dir,
                &Entry {
                    name: name.clone(),
                    ino,
                    kind,
                },
            )?;
            match w {
                Want::File(o) => tx.put_xattr(ino, FILE_XATTR, &json(&ext_of(state, o)))?,
                Want::Dir(p) => {
                    dirs += 1;
                    tx.put_xattr(
                        ino,
                        DIR_XATTR,
                        &json(&DirState {
                            attach: state.attach,
                            prefix: p.to_string(),
                            listed: 0,
                            digest: String::new(),
                        }),
                    )?
                }
            }
            inodes += 1;
            stats.added += 1;
        }
        // Entries whose objects are gone (only imported ones: nothing else can be here).
        for e in edges.into_values() {
            let imported = tx.get_node(e.ino)?.is_none_or(|n| n.rdev == state.attach);
            if imported {
                if e.kind == FileKind::Dir {
                    dirs -= 1;
                }
                inodes -= remove_tree(tx, dir, &e)?;
                stats.removed += 1;
            }
        }
        if stats.added + stats.updated + stats.removed > 0 {
            d.nlink = (i64::from(d.nlink) + dirs).max(2) as u32;
            d.mtime = now;
            d.ctime = now;
            tx.put_node(&d)?;
        }
        Self::account(tx, 0, inodes)?;
        Ok(Ok(stats))
    }
}

/// A node imported from (or the directory of) attachment `attach`: read-only, owned by root,
/// marked by `rdev`.
fn source_node(
    ino: Ino,
    kind: FileKind,
    attach: u32,
    parent: Ino,
    length: u64,
    mtime: i64,
    now: i64,
) -> Node {
    let dir = kind == FileKind::Dir;
    Node {
        ino,
        kind,
        mode: if dir { 0o555 } else { 0o444 },
        uid: 0,
        gid: 0,
        atime: mtime,
        mtime,
        ctime: now,
        nlink: if dir { 2 } else { 1 },
        length,
        rdev: attach,
        parent,
        seq: 0,
        masks: vec![],
    }
}

fn ext_of(state: &DirState, o: &SourceObject) -> ExtFile {
    ExtFile {
        attach: state.attach,
        key: o.key.clone(),
        etag: o.etag.clone(),
        size: o.size,
    }
}
