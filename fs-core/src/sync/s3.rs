//! An S3 bucket or prefix as a sync endpoint, through the file system's own S3 client
//! ([`S3Store`]): directories are key prefixes listed one level at a time (LIST with
//! delimiter `/`), a file is one object, its time is the object's Last-Modified. Objects are
//! written with one PUT (multipart above 16 MiB), which replaces atomically: no temporary
//! names. Modes, owners, extended attributes, symlinks and hard links cannot be carried.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::endpoint::{Caps, Counters, Endpoint, Item, Kind, Reader, Writer};
use super::{Result, SyncError};
use crate::metrics::Metrics;
use crate::object::{ObjectStore, RetrySettings, S3Store, StorageConfig, layered};

/// Bytes asked of one ranged GET.
const PIECE: u64 = 8 << 20;

pub struct S3Dir {
    raw: Arc<S3Store>,
    store: Arc<dyn ObjectStore>,
    url: String,
    counters: Counters,
    /// Bytes of files being gathered for upload (a PUT takes the whole object).
    uploads: Arc<Budget>,
}

/// Most bytes held for uploads at once, all threads together; a larger file waits until it
/// is alone.
const UPLOAD_BUDGET: u64 = 1 << 30;

/// A bound on the bytes held in memory by writers.
struct Budget {
    used: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    fn acquire(&self, n: u64) {
        let mut used = self.used.lock();
        while *used > 0 && *used + n > UPLOAD_BUDGET {
            self.freed.wait(&mut used);
        }
        *used += n;
    }
    fn release(&self, n: u64) {
        *self.used.lock() -= n;
        self.freed.notify_all();
    }
}

/// Where a bucket is and how to sign for it.
#[derive(Debug, Clone, Default)]
pub struct S3Access {
    /// `http(s)://host[:port]`; empty: `AWS_ENDPOINT_URL`, else AWS for the region.
    pub endpoint: String,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    pub region: Option<String>,
}

impl S3Access {
    /// Fill what is not given from the usual AWS environment variables.
    pub fn with_env(mut self) -> S3Access {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if self.endpoint.is_empty() {
            self.endpoint = env("AWS_ENDPOINT_URL_S3")
                .or_else(|| env("AWS_ENDPOINT_URL"))
                .unwrap_or_default();
        }
        self.access_key = self.access_key.or_else(|| env("AWS_ACCESS_KEY_ID"));
        self.secret_key = self.secret_key.or_else(|| env("AWS_SECRET_ACCESS_KEY"));
        self.region = self
            .region
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"));
        self
    }
}

fn obj_err(url: &str, e: crate::object::ObjectError) -> SyncError {
    SyncError::Io(format!("{url}: {e}"))
}

impl S3Dir {
    /// `s3://bucket[/prefix]` with `access`.
    pub fn open(url: &str, access: S3Access, metrics: Arc<Metrics>) -> Result<S3Dir> {
        let rest = url.strip_prefix("s3://").unwrap_or(url);
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() {
            return Err(SyncError::Invalid(format!(
                "{url}: name a bucket, e.g. s3://bucket or s3://bucket/prefix"
            )));
        }
        let endpoint = if access.endpoint.is_empty() {
            let region = access.region.clone().unwrap_or_else(|| "us-east-1".into());
            format!("https://s3.{region}.amazonaws.com")
        } else {
            access.endpoint.trim_end_matches('/').to_string()
        };
        if access.access_key.is_none() || access.secret_key.is_none() {
            return Err(SyncError::Invalid(format!(
                "{url}: no S3 keys: give --src-access-key/--src-secret-key (or --dst-…), or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )));
        }
        let cfg = StorageConfig {
            storage: "s3".into(),
            bucket: format!("{endpoint}/{rest}"),
            access_key: access.access_key,
            secret_key: access.secret_key,
            region: access.region,
        };
        let settings = cfg
            .s3_settings()
            .map_err(|e| SyncError::Invalid(format!("{url}: {e}")))?;
        let raw = Arc::new(S3Store::new(settings).map_err(|e| obj_err(url, e))?);
        let store = layered(raw.clone(), metrics, RetrySettings::default());
        Ok(S3Dir {
            raw,
            store,
            url: format!("s3://{rest} (endpoint {endpoint})"),
            counters: Counters::default(),
            uploads: Arc::new(Budget {
                used: Mutex::new(0),
                freed: Condvar::new(),
            }),
        })
    }

    fn prefix(dir: &str) -> String {
        if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        }
    }

    /// Make sure the bucket exists and the keys work (creates a missing bucket for a
    /// destination).
    pub fn init(&self) -> Result<()> {
        self.store.init().map_err(|e| obj_err(&self.url, e))
    }
}

struct S3Reader {
    store: Arc<dyn ObjectStore>,
    key: String,
    off: u64,
    size: u64,
    url: String,
}

impl Reader for S3Reader {
    fn next(&mut self) -> Result<Option<Bytes>> {
        if self.off >= self.size {
            return Ok(None);
        }
        let len = PIECE.min(self.size - self.off);
        let b = self
            .store
            .get(&self.key, self.off, Some(len))
            .map_err(|e| obj_err(&self.url, e))?;
        if b.is_empty() {
            return Err(SyncError::Io(format!(
                "{}: {} ended at {} bytes, listed with {} (changed while copied; run the sync again)",
                self.url, self.key, self.off, self.size
            )));
        }
        self.off += b.len() as u64;
        Ok(Some(b))
    }
}

struct S3Writer {
    store: Arc<dyn ObjectStore>,
    key: String,
    buf: Vec<u8>,
    url: String,
    budget: Arc<Budget>,
    held: u64,
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        self.budget.release(self.held);
    }
}

impl Writer for S3Writer {
    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(data);
        Ok(())
    }
    fn commit(mut self: Box<Self>, _item: &Item, _xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        let buf = std::mem::take(&mut self.buf);
        self.store
            .put(&self.key, Bytes::from(buf))
            .map_err(|e| obj_err(&self.url, e))
    }
    fn abort(self: Box<Self>) {}
}

impl Endpoint for S3Dir {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn caps(&self) -> Caps {
        Caps {
            attrs: false,
            xattrs: false,
            symlinks: false,
            hardlinks: false,
            dirs: false,
        }
    }

    fn counters(&self) -> &Counters {
        &self.counters
    }

    fn stat(&self, _path: &str) -> Result<Option<Item>> {
        Ok(None)
    }

    fn list(&self, dir: &str) -> Result<Option<Vec<Item>>> {
        let prefix = Self::prefix(dir);
        self.counters.list();
        let (objects, prefixes) = self
            .raw
            .list_dir(&prefix)
            .map_err(|e| obj_err(&self.url, e))?;
        let mut out = Vec::new();
        for o in objects {
            let name = &o.key[prefix.len().min(o.key.len())..];
            // Directory markers (`dir/`) and odd keys (`a//b`) have no file name.
            if name.is_empty() || name.contains('/') {
                continue;
            }
            out.push(Item::plain(
                name.to_string(),
                Kind::File,
                o.size,
                o.mtime_ns,
            ));
        }
        for p in prefixes {
            let name = p[prefix.len().min(p.len())..].trim_end_matches('/');
            if name.is_empty() || name.contains('/') {
                continue;
            }
            out.push(Item::plain(name.to_string(), Kind::Dir, 0, 0));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        // A file and a prefix of the same name: the file is listed, the prefix's objects
        // are reachable only by listing it, which a tree cannot express. Keep the directory.
        out.dedup_by(|b, a| {
            a.name == b.name && {
                if b.kind == Kind::Dir {
                    std::mem::swap(a, b);
                }
                true
            }
        });
        Ok(Some(out))
    }

    fn open(&self, path: &str, item: &Item) -> Result<Box<dyn Reader>> {
        Ok(Box::new(S3Reader {
            store: self.store.clone(),
            key: path.to_string(),
            off: 0,
            size: item.size,
            url: self.url.clone(),
        }))
    }

    fn create(&self, path: &str, item: &Item) -> Result<Box<dyn Writer + '_>> {
        self.uploads.acquire(item.size);
        Ok(Box::new(S3Writer {
            store: self.store.clone(),
            key: path.to_string(),
            buf: Vec::with_capacity(item.size.min(64 << 20) as usize),
            url: self.url.clone(),
            budget: self.uploads.clone(),
            held: item.size,
        }))
    }

    fn mkdir(&self, _path: &str, _item: &Item) -> Result<()> {
        Ok(())
    }

    fn set_attrs(&self, _path: &str, _item: &Item) -> Result<()> {
        Ok(())
    }

    fn readlink(&self, path: &str) -> Result<Vec<u8>> {
        Err(SyncError::Invalid(format!(
            "{}: {path}: S3 has no symbolic links",
            self.url
        )))
    }

    fn symlink(&self, path: &str, _target: &[u8], _item: &Item) -> Result<()> {
        self.readlink(path).map(|_| ())
    }

    fn link(&self, existing: &str, path: &str) -> Result<()> {
        Err(SyncError::Invalid(format!(
            "{}: {path}: S3 has no hard links (to {existing})",
            self.url
        )))
    }

    fn remove(&self, path: &str, kind: Kind) -> Result<()> {
        if kind != Kind::Dir {
            return self.store.delete(path).map_err(|e| obj_err(&self.url, e));
        }
        let prefix = format!("{path}/");
        loop {
            self.counters.list();
            let page = self
                .store
                .list(&prefix, None, 1000)
                .map_err(|e| obj_err(&self.url, e))?;
            if page.is_empty() {
                return Ok(());
            }
            for o in page {
                self.store
                    .delete(&o.key)
                    .map_err(|e| obj_err(&self.url, e))?;
            }
        }
    }

    fn xattrs(&self, _path: &str, _listed: Option<&Item>) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(Vec::new())
    }

    fn set_xattrs(&self, _path: &str, _want: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        Ok(())
    }
}
