//! Attached sources in the VFS (docs/DATASETS.md): a directory of a source is listed into the
//! metadata on first access and again once its listing is older than the attachment's
//! refresh interval; a file of a source is read in blocks of the volume's block size, each a
//! ranged, ETag-conditional read of the source's object, cached like any block (memory, disk,
//! cache group) under a key derived from the object's key and ETag, so a replaced object's
//! blocks are new keys and never mixed with the old ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::reader::Origin;
use super::{Piece, Result, Vfs, VfsError};
use crate::meta::{ExtFile, FileKind, Ino, Node};
use crate::source::{self, Source};

/// State of attached sources in one client.
#[derive(Default)]
pub(super) struct Attached {
    /// Inodes of sources seen by this client: inode → attachment id.
    inos: HashMap<Ino, u32>,
    /// Directories whose import state was checked, and when.
    checked: HashMap<Ino, Instant>,
    /// Sources by attachment id (opened on first use) and their refresh interval.
    sources: HashMap<u32, (Arc<dyn Source>, u64)>,
    /// Imported files' objects, and when they were read from the metadata.
    files: HashMap<Ino, (Arc<ExtFile>, Instant)>,
}

/// The cache key of block `k` (`len` bytes) of object `key` with ETag `etag` of attachment
/// `attach` (docs/FORMAT.md, "Attached sources").
pub fn ext_block_key(volume: &str, attach: u32, key: &str, etag: &str, k: u64, len: u64) -> String {
    let mut h = Sha256::new();
    h.update(attach.to_le_bytes());
    h.update(key.as_bytes());
    h.update([0u8]);
    h.update(etag.as_bytes());
    let d = h.finalize();
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{volume}/ext/{attach}/{}/{hex}_{k}_{len}", &hex[..2])
}

impl Vfs {
    /// Remember inodes of attached sources as they are seen (lookups, getattr).
    pub(super) fn note_node(&self, n: &Node) {
        if n.rdev != 0 && matches!(n.kind, FileKind::File | FileKind::Dir) {
            let mut a = self.attached.lock();
            if a.inos.len() > 1_000_000 {
                a.inos.clear();
            }
            a.inos.insert(n.ino, n.rdev);
        }
    }

    fn attach_of(&self, ino: Ino) -> Option<u32> {
        self.attached.lock().inos.get(&ino).copied()
    }

    /// Use `src` for attachment `id` in this client (tests; mounts open sources from the
    /// attachment record).
    pub fn set_source(&self, id: u32, src: Arc<dyn Source>, refresh_secs: u64) {
        self.attached.lock().sources.insert(id, (src, refresh_secs));
    }

    /// The source of attachment `id` and its refresh interval.
    pub(super) fn source(&self, id: u32) -> Result<(Arc<dyn Source>, u64)> {
        if let Some(s) = self.attached.lock().sources.get(&id) {
            return Ok(s.clone());
        }
        let a = self
            .meta
            .attachment(id)?
            .ok_or_else(|| VfsError::Source(format!("attachment {id} no longer exists")))?;
        let src: Arc<dyn Source> = Arc::new(source::InstrumentedSource {
            inner: a
                .open()
                .map_err(|e| VfsError::Source(format!("{} ({}): {e}", a.path, a.source)))?,
            metrics: self.metrics.clone(),
        });
        let entry = (src, a.refresh_secs);
        self.attached.lock().sources.insert(id, entry.clone());
        Ok(entry)
    }

    /// Before a lookup in or a listing of directory `dir`: if it belongs to a source, make
    /// sure its listing is imported and not older than the refresh interval. A source that
    /// cannot be listed leaves the last imported listing in place (logged); a directory
    /// never listed then fails with EIO.
    pub(super) fn ensure_listed(&self, dir: Ino) -> Result<()> {
        let Some(id) = self.attach_of(dir) else {
            return Ok(());
        };
        // Other clients' imports and `--sync` are noticed within the attribute timeout.
        let recheck = Duration::from_secs_f64(self.settings.attr_timeout.max(0.1));
        if self
            .attached
            .lock()
            .checked
            .get(&dir)
            .is_some_and(|t| t.elapsed() < recheck)
        {
            return Ok(());
        }
        let _one = self.import_lock.lock();
        let Some(state) = self.meta.dir_state(dir)? else {
            return Ok(());
        };
        let (src, refresh) = self.source(id)?;
        let now = crate::meta::now_ns() / 1_000_000_000;
        let stale = state.listed == 0 || (refresh > 0 && now - state.listed >= refresh as i64);
        if stale {
            match source::refresh_dir(&self.meta, dir, &state, src.as_ref()) {
                Ok(s) if !s.unchanged => {
                    tracing::info!(volume = %self.format.name, path = %self.path(dir), source = %src.describe(),
                        prefix = %state.prefix, added = s.added, updated = s.updated, removed = s.removed,
                        "imported a source listing");
                    self.attached.lock().files.clear();
                }
                Ok(_) => {}
                Err(e) if state.listed == 0 => {
                    tracing::warn!(volume = %self.format.name, path = %self.path(dir), error = %e, "cannot list the source");
                    return Err(VfsError::Source(format!("{}: {e}", self.path(dir))));
                }
                Err(e) => {
                    tracing::warn!(volume = %self.format.name, path = %self.path(dir), error = %e,
                        "cannot refresh the listing from the source; serving the last one");
                }
            }
        }
        let mut a = self.attached.lock();
        if a.checked.len() > 100_000 {
            a.checked.clear();
        }
        a.checked.insert(dir, Instant::now());
        Ok(())
    }

    /// The object behind file `ino` if it belongs to a source (re-read from the metadata
    /// after the attribute timeout).
    pub(super) fn ext_file_of(&self, ino: Ino) -> Result<Option<Arc<ExtFile>>> {
        if self.attach_of(ino).is_none() {
            return Ok(None);
        }
        let ttl = Duration::from_secs_f64(self.settings.attr_timeout.max(0.1));
        if let Some((f, at)) = self.attached.lock().files.get(&ino)
            && at.elapsed() < ttl
        {
            return Ok(Some(f.clone()));
        }
        let Some(f) = self.meta.ext_file(ino)? else {
            return Ok(None);
        };
        let f = Arc::new(f);
        let mut a = self.attached.lock();
        if a.files.len() > 100_000 {
            a.files.clear();
        }
        a.files.insert(ino, (f.clone(), Instant::now()));
        Ok(Some(f))
    }

    /// The pieces of bytes `[off, end)` of a source's file, each block's origin registered
    /// with the reader.
    pub(super) fn plan_ext(&self, f: &ExtFile, off: u64, end: u64) -> Vec<Piece> {
        let bs = self.format.block_size as u64;
        let end = end.min(f.size);
        let mut out = Vec::new();
        let mut pos = off;
        while pos < end {
            let k = pos / bs;
            let bstart = k * bs;
            let blen = (f.size - bstart).min(bs);
            let to = (end - bstart).min(blen);
            let key = ext_block_key(&self.format.name, f.attach, &f.key, &f.etag, k, blen);
            self.reader.register_origin(
                &key,
                Origin {
                    attach: f.attach,
                    key: f.key.clone(),
                    etag: f.etag.clone(),
                    off: bstart,
                },
            );
            out.push(Piece::Block {
                key,
                len: blen as usize,
                from: (pos - bstart) as usize,
                to: to as usize,
            });
            pos = bstart + to;
        }
        out
    }

    /// `strata info` details of a source's file or directory.
    pub(super) fn ext_info(&self, n: &Node) -> Option<serde_json::Value> {
        if n.rdev == 0 || !matches!(n.kind, FileKind::File | FileKind::Dir) {
            return None;
        }
        let a = self.meta.attachment(n.rdev).ok().flatten()?;
        let mut v = serde_json::json!({
            "attachment": a.id,
            "attached_at": a.path,
            "source": a.source,
            "endpoint": a.endpoint,
            "refresh_secs": a.refresh_secs,
        });
        if let Ok(Some(f)) = self.meta.ext_file(n.ino) {
            v["object"] =
                serde_json::json!(format!("{}/{}", a.source.trim_end_matches('/'), f.key));
            v["etag"] = serde_json::json!(f.etag);
            v["size"] = serde_json::json!(f.size);
        }
        if let Ok(Some(d)) = self.meta.dir_state(n.ino) {
            v["prefix"] = serde_json::json!(d.prefix);
            v["listed"] = serde_json::json!(d.listed);
        }
        Some(v)
    }
}
