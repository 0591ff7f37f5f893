//! External sources: buckets (or directories) that other systems write, attached to a
//! directory of a volume with `strata attach` and read through Strata's caches without
//! copying (docs/DATASETS.md). A [`Source`] lists one "directory" level (a prefix and the
//! delimiter `/`) and reads byte ranges of an object conditionally on its ETag, so an object
//! replaced behind Strata's back is reported as changed, never served as a mix of old and new
//! bytes.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::object::{ListedObject, ObjectError, Result, S3Store, StorageConfig};

/// An object of a source, as listed.
pub type SourceObject = ListedObject;

/// One level of a source: the objects right below a prefix and the sub-prefixes (keys
/// relative to the source's own prefix; sub-prefixes end with `/`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub objects: Vec<SourceObject>,
    pub prefixes: Vec<String>,
}

/// A source of objects written by others. Blocking; safe to call from many threads.
pub trait Source: Send + Sync + 'static {
    /// Without secrets, e.g. `s3://bucket/prefix/ (endpoint http://…)`.
    fn describe(&self) -> String;
    /// The level below `prefix` (empty, or ending with `/`).
    fn list_dir(&self, prefix: &str) -> Result<Listing>;
    /// Bytes `[off, off + len)` of `key` into `sink`, only while its ETag is `etag`
    /// ([`ObjectError::Changed`] otherwise). Returns the bytes delivered.
    fn read(
        &self,
        key: &str,
        etag: &str,
        off: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<u64>;
}

/// Attempts of a source request that failed transiently (then the error is final: EIO).
const ATTEMPTS: u32 = 4;

/// Run `f` with retries of transient errors (0.2 s doubling), restarting reads where the
/// previous attempt stopped is the caller's business (it passes what it still needs).
pub fn with_retries<T>(what: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let mut delay = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        match f() {
            Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                tracing::debug!(what, attempt, error = %e, "source request failed, retrying");
                std::thread::sleep(delay);
                delay *= 2;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// An attachment: a source attached to a directory of a volume. Stored as JSON in the
/// `setting` table under `attach/<id>` (docs/FORMAT.md, "Attached sources").
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// 1, 2, … (never reused); also the `rdev` mark of the inodes it imported.
    pub id: u32,
    /// The directory's inode and its path when attached (for messages).
    pub ino: u64,
    pub path: String,
    /// `s3://bucket[/prefix]` or `file:///directory`.
    pub source: String,
    /// S3 endpoint, e.g. `http://127.0.0.1:8333` (default: AWS in the region).
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub access_key: Option<String>,
    #[serde(default)]
    pub secret_key: Option<String>,
    /// Path-style addressing (default true, what S3-compatible services expect).
    #[serde(default = "yes")]
    pub path_style: bool,
    /// Seconds a directory's imported listing is trusted before it is listed again on
    /// access (0: only `strata attach --sync` refreshes).
    pub refresh_secs: u64,
    /// Always true in this version: there is no write-back to a source.
    pub read_only: bool,
}

fn yes() -> bool {
    true
}

impl fmt::Debug for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attachment")
            .field("id", &self.id)
            .field("path", &self.path)
            .field("source", &self.source)
            .field("endpoint", &self.endpoint)
            .field("access_key", &self.access_key)
            .field("secret_key", &self.secret_key.as_ref().map(|_| "***"))
            .field("refresh_secs", &self.refresh_secs)
            .finish()
    }
}

impl Attachment {
    /// The source this attachment reads.
    pub fn open(&self) -> Result<Arc<dyn Source>> {
        if let Some(dir) = self.source.strip_prefix("file://") {
            let root = PathBuf::from(dir);
            if !root.is_dir() {
                return Err(ObjectError::NoBucket(format!(
                    "{} (not a directory)",
                    self.source
                )));
            }
            return Ok(Arc::new(DirSource { root }));
        }
        let Some(rest) = self.source.strip_prefix("s3://") else {
            return Err(ObjectError::Other(format!(
                "--source {:?}: give s3://BUCKET[/PREFIX] (with --endpoint for an S3-compatible service) or file:///DIRECTORY",
                self.source
            )));
        };
        let endpoint = match &self.endpoint {
            Some(e) => e.trim_end_matches('/').to_string(),
            None => format!(
                "https://s3.{}.amazonaws.com",
                self.region.as_deref().unwrap_or("us-east-1")
            ),
        };
        let cfg = StorageConfig {
            storage: "s3".into(),
            bucket: format!(
                "{endpoint}/{}?path-style={}",
                rest.trim_matches('/'),
                self.path_style
            ),
            access_key: self.access_key.clone(),
            secret_key: self.secret_key.clone(),
            region: self.region.clone(),
        };
        let mut settings = cfg.s3_settings()?;
        // A source read that stalls is retried; a dead source must fail reads well within
        // the 30 s users wait.
        settings.op_timeout = Duration::from_secs(5);
        Ok(Arc::new(S3Source(S3Store::new(settings)?)))
    }
}

/// A source whose requests are counted in the metrics (`strata_source_*`).
pub struct InstrumentedSource {
    pub inner: Arc<dyn Source>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Source for InstrumentedSource {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn list_dir(&self, prefix: &str) -> Result<Listing> {
        let r = self.inner.list_dir(prefix);
        self.metrics.source_request("list", r.is_ok(), 0);
        r
    }
    fn read(
        &self,
        key: &str,
        etag: &str,
        off: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<u64> {
        let r = self.inner.read(key, etag, off, len, sink);
        self.metrics
            .source_request("get", r.is_ok(), *r.as_ref().unwrap_or(&0));
        r
    }
}

/// An S3 bucket or prefix.
pub struct S3Source(pub S3Store);

impl Source for S3Source {
    fn describe(&self) -> String {
        crate::object::ObjectStore::describe(&self.0)
    }
    fn list_dir(&self, prefix: &str) -> Result<Listing> {
        with_retries("list", || self.0.list_dir(prefix))
            .map(|(objects, prefixes)| Listing { objects, prefixes })
    }
    fn read(
        &self,
        key: &str,
        etag: &str,
        off: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<u64> {
        let mut done = 0u64;
        with_retries("get", || {
            let n = self
                .0
                .get_range_if(key, etag, off + done, len - done, &mut |c| sink(c))?;
            done += n;
            if done < len {
                return Err(ObjectError::Transient(format!(
                    "get {key:?}: {done} of {len} bytes before the stream ended"
                )));
            }
            Ok(done)
        })
    }
}

/// A directory of this machine (or a network file system) as a source: files are objects,
/// sub-directories are prefixes, the ETag is the modification time and size.
pub struct DirSource {
    pub root: PathBuf,
}

fn file_etag(md: &std::fs::Metadata) -> (String, i64) {
    use std::os::unix::fs::MetadataExt;
    let mtime = md.mtime() * 1_000_000_000 + md.mtime_nsec();
    (format!("{mtime:x}-{:x}", md.len()), mtime)
}

fn io_err(what: String, e: std::io::Error) -> ObjectError {
    match e.kind() {
        std::io::ErrorKind::NotFound => ObjectError::NotFound(what),
        std::io::ErrorKind::PermissionDenied => ObjectError::Denied(what),
        _ => ObjectError::Transient(format!("{what}: {e}")),
    }
}

impl Source for DirSource {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
    fn list_dir(&self, prefix: &str) -> Result<Listing> {
        let dir = self.root.join(prefix);
        let mut out = Listing::default();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            // A prefix with nothing under it lists empty, as in S3.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err(dir.display().to_string(), e)),
        };
        for e in rd {
            let e = e.map_err(|e| io_err(dir.display().to_string(), e))?;
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                out.prefixes.push(format!("{prefix}{name}/"));
            } else if md.is_file() {
                let (etag, mtime_ns) = file_etag(&md);
                out.objects.push(SourceObject {
                    key: format!("{prefix}{name}"),
                    size: md.len(),
                    etag,
                    mtime_ns,
                });
            }
        }
        out.objects.sort_by(|a, b| a.key.cmp(&b.key));
        out.prefixes.sort();
        Ok(out)
    }
    fn read(
        &self,
        key: &str,
        etag: &str,
        off: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<u64> {
        use std::os::unix::fs::FileExt;
        let path = self.root.join(key);
        let what = path.display().to_string();
        let f = std::fs::File::open(&path).map_err(|e| io_err(what.clone(), e))?;
        let check = |f: &std::fs::File| -> Result<()> {
            let md = f.metadata().map_err(|e| io_err(what.clone(), e))?;
            if file_etag(&md).0 != etag {
                return Err(ObjectError::Changed(format!(
                    "{what}: its ETag is no longer {etag}"
                )));
            }
            Ok(())
        };
        check(&f)?;
        let mut buf = vec![0u8; len.min(4 << 20) as usize];
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(buf.len() as u64) as usize;
            let n = f
                .read_at(&mut buf[..want], off + done)
                .map_err(|e| io_err(what.clone(), e))?;
            if n == 0 {
                break;
            }
            sink(&buf[..n]);
            done += n as u64;
        }
        // Replaced while being read: what was delivered may be a mix, so it is an error.
        check(&f)?;
        Ok(done)
    }
}

/// An in-memory source for tests: objects with ETags, request counters, and an "offline"
/// switch that makes every request fail as an unreachable service would.
#[derive(Default)]
pub struct MemSource {
    objects: Mutex<HashMap<String, (Bytes, String, i64)>>,
    next_etag: AtomicU64,
    pub lists: AtomicU64,
    pub gets: AtomicU64,
    pub offline: std::sync::atomic::AtomicBool,
}

impl MemSource {
    pub fn new() -> Arc<MemSource> {
        Arc::new(MemSource::default())
    }
    /// Write (or replace) an object; returns its new ETag.
    pub fn put(&self, key: &str, data: impl Into<Bytes>) -> String {
        let etag = format!("e{}", self.next_etag.fetch_add(1, Ordering::Relaxed) + 1);
        let mtime = crate::meta::now_ns();
        self.objects
            .lock()
            .insert(key.to_string(), (data.into(), etag.clone(), mtime));
        etag
    }
    pub fn delete(&self, key: &str) {
        self.objects.lock().remove(key);
    }
    fn up(&self) -> Result<()> {
        if self.offline.load(Ordering::Relaxed) {
            return Err(ObjectError::Transient("mem source: offline".into()));
        }
        Ok(())
    }
}

impl Source for MemSource {
    fn describe(&self) -> String {
        "mem://source".into()
    }
    fn list_dir(&self, prefix: &str) -> Result<Listing> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        self.up()?;
        let mut out = Listing::default();
        let mut seen = std::collections::BTreeSet::new();
        for (k, (data, etag, mtime)) in self.objects.lock().iter() {
            let Some(rest) = k.strip_prefix(prefix) else {
                continue;
            };
            match rest.split_once('/') {
                Some((dir, _)) => {
                    seen.insert(format!("{prefix}{dir}/"));
                }
                None => out.objects.push(SourceObject {
                    key: k.clone(),
                    size: data.len() as u64,
                    etag: etag.clone(),
                    mtime_ns: *mtime,
                }),
            }
        }
        out.objects.sort_by(|a, b| a.key.cmp(&b.key));
        out.prefixes = seen.into_iter().collect();
        Ok(out)
    }
    fn read(
        &self,
        key: &str,
        etag: &str,
        off: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<u64> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.up()?;
        let (data, cur) = {
            let o = self.objects.lock();
            let (d, e, _) = o
                .get(key)
                .ok_or_else(|| ObjectError::NotFound(key.to_string()))?;
            (d.clone(), e.clone())
        };
        if cur != etag {
            return Err(ObjectError::Changed(format!(
                "{key}: ETag {cur}, expected {etag}"
            )));
        }
        let start = (off as usize).min(data.len());
        let end = (off.saturating_add(len) as usize).min(data.len());
        sink(&data[start..end]);
        Ok((end - start) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_source_lists_one_level_and_reads_conditionally() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/x.bin"), b"0123456789").unwrap();
        std::fs::write(d.path().join("top"), b"t").unwrap();
        let s = DirSource {
            root: d.path().to_path_buf(),
        };
        let root = s.list_dir("").unwrap();
        assert_eq!(root.prefixes, vec!["a/"]);
        assert_eq!(root.objects.len(), 1);
        let a = s.list_dir("a/").unwrap();
        assert_eq!(a.prefixes, vec!["a/b/"]);
        let x = &a.objects[0];
        assert_eq!((x.key.as_str(), x.size), ("a/x.bin", 10));
        let mut got = Vec::new();
        s.read("a/x.bin", &x.etag, 2, 5, &mut |c| got.extend_from_slice(c))
            .unwrap();
        assert_eq!(got, b"23456");
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(d.path().join("a/x.bin"), b"changed!!!").unwrap();
        let err = s.read("a/x.bin", &x.etag, 0, 4, &mut |_| {}).unwrap_err();
        assert!(matches!(err, ObjectError::Changed(_)), "{err}");
        assert!(s.list_dir("nothing/").unwrap().objects.is_empty());
    }

    #[test]
    fn mem_source_lists_levels_and_refuses_a_replaced_object() {
        let s = MemSource::new();
        let e1 = s.put("d/f", &b"abc"[..]);
        s.put("d/e/g", &b"x"[..]);
        s.put("h", &b"y"[..]);
        let l = s.list_dir("d/").unwrap();
        assert_eq!(l.prefixes, vec!["d/e/"]);
        assert_eq!(l.objects[0].key, "d/f");
        let e2 = s.put("d/f", &b"new"[..]);
        assert_ne!(e1, e2);
        assert!(matches!(
            s.read("d/f", &e1, 0, 3, &mut |_| {}),
            Err(ObjectError::Changed(_))
        ));
        s.offline.store(true, Ordering::Relaxed);
        let mut tries = 0;
        let r = with_retries("list", || {
            tries += 1;
            s.list_dir("")
        });
        assert!(r.is_err());
        assert_eq!(tries, ATTEMPTS);
    }
}

/// What a refresh of an attachment did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Directories listed in the source (one LIST each, all pages).
    pub listed: u64,
    /// Of those, directories whose listing had changed.
    pub changed: u64,
    pub added: u64,
    pub updated: u64,
    pub removed: u64,
}

/// Errors of importing a source's listings.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("listing {prefix:?} of {source_name} failed: {err}")]
    List {
        prefix: String,
        source_name: String,
        err: ObjectError,
    },
    #[error(transparent)]
    Meta(#[from] crate::meta::MetaError),
}

/// List directory `dir` (in state `state`) of a source again and import what changed.
pub fn refresh_dir(
    meta: &crate::meta::Meta,
    dir: u64,
    state: &crate::meta::DirState,
    src: &dyn Source,
) -> std::result::Result<crate::meta::ImportStats, SourceError> {
    let listing = src
        .list_dir(&state.prefix)
        .map_err(|err| SourceError::List {
            prefix: state.prefix.clone(),
            source_name: src.describe(),
            err,
        })?;
    Ok(meta.import_listing(dir, &listing)?)
}

/// `strata attach --sync`: list every directory of attachment `a` imported so far (the
/// attached directory at least) and import what changed; directories never opened stay
/// unlisted until first access. One LIST per directory; only changed listings write.
pub fn sync(
    meta: &crate::meta::Meta,
    a: &Attachment,
    src: &dyn Source,
) -> std::result::Result<SyncReport, SourceError> {
    let mut report = SyncReport::default();
    let mut dirs = meta.imported_dirs(a.id)?;
    if dirs.is_empty()
        && let Some(state) = meta.dir_state(a.ino)?
    {
        dirs.push((a.ino, state));
    }
    // Breadth first, so a directory removed by its parent's import is skipped.
    for (dir, state) in dirs {
        if meta.dir_state(dir).ok().flatten().is_none() {
            continue;
        }
        let s = refresh_dir(meta, dir, &state, src)?;
        report.listed += 1;
        if !s.unchanged {
            report.changed += 1;
        }
        report.added += s.added;
        report.updated += s.updated;
        report.removed += s.removed;
    }
    Ok(report)
}

/// Errors of `strata attach`/`detach`, each naming the fix.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "--path {0:?}: give the directory to create for the source, below the volume root, e.g. /datasets/web"
    )]
    BadPath(String),
    #[error("--path {path}: {err}")]
    Parent {
        path: String,
        err: crate::volume::VolumeError,
    },
    #[error(
        "--path {0}: it exists already (an attached source gets a new directory: choose another name, or `strata detach` the one there)"
    )]
    Exists(String),
    #[error(
        "--path {0}: no source is attached there (`strata attach META_URL --list` shows the attachments)"
    )]
    NotAttached(String),
    #[error("--source {source_url}: {err}")]
    Source {
        source_url: String,
        err: ObjectError,
    },
    #[error(transparent)]
    Import(#[from] SourceError),
    #[error(transparent)]
    Meta(#[from] crate::meta::MetaError),
}

/// Attach `a`'s source at `path` (a new directory whose parent exists): the source is
/// listed once first, so wrong keys, bucket or endpoint are reported now, not at first read.
pub fn attach_at(
    meta: &crate::meta::Meta,
    path: &str,
    a: Attachment,
) -> std::result::Result<Attachment, AttachError> {
    let clean = path.trim_end_matches('/');
    let (parent, name) = clean
        .rsplit_once('/')
        .filter(|(_, n)| !n.is_empty() && *n != "." && *n != "..")
        .ok_or_else(|| AttachError::BadPath(path.to_string()))?;
    let parent_ino =
        crate::volume::resolve_dir(meta, parent).map_err(|err| AttachError::Parent {
            path: path.to_string(),
            err,
        })?;
    let src = a.open().map_err(|err| AttachError::Source {
        source_url: a.source.clone(),
        err,
    })?;
    let listing = src.list_dir("").map_err(|err| AttachError::Source {
        source_url: a.source.clone(),
        err,
    })?;
    let a = Attachment {
        path: clean.to_string(),
        ..a
    };
    let a = match meta.attach(parent_ino, name.as_bytes(), a) {
        Err(crate::meta::MetaError::Exists) => return Err(AttachError::Exists(path.to_string())),
        other => other?,
    };
    // The listing just taken is the attached directory's first import (no second LIST at
    // the first access).
    meta.import_listing(a.ino, &listing)?;
    Ok(a)
}

/// The attachment whose directory is `path`.
pub fn find_attachment(
    meta: &crate::meta::Meta,
    path: &str,
) -> std::result::Result<Attachment, AttachError> {
    let clean = path.trim_end_matches('/');
    let ino = crate::volume::resolve_dir(meta, clean)
        .map_err(|_| AttachError::NotAttached(path.to_string()))?;
    meta.attachments()?
        .into_iter()
        .find(|a| a.ino == ino)
        .ok_or_else(|| AttachError::NotAttached(path.to_string()))
}
