//! Objects as files: S3 keys map to paths below the gateway's root directory (the volume root
//! or `--subdir`). Everything here is blocking (it calls the [`Vfs`]); the server runs it on
//! tokio's blocking pool.
//!
//! - A key is a `/`-separated path of non-empty components other than `.` and `..`; a key
//!   ending in `/` names a directory (a "folder marker"). The reserved top-level directory
//!   [`RESERVED`] holds temporary files and multipart uploads and is never listed.
//! - A PUT writes a temporary file under `RESERVED/tmp/`, checks the body, stores the MD5,
//!   then renames the file into place (creating parent directories): readers see the old
//!   object or the new one, never a part.
//! - The ETag of an object written through the gateway is the MD5 of its content (or
//!   `md5-of-part-md5s-N` for multipart), stored in the xattr [`MD5_XATTR`] together with
//!   the file's mtime and length when it was written; a file changed since (through a mount)
//!   or written without the gateway has a weak ETag instead: a hash of its inode, mtime and
//!   length with the suffix `-0`, which no client takes for an MD5.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use crate::meta::{Ctx, FileKind, Ino, MetaError, Node};
use crate::vfs::{Vfs, VfsError};

use super::body::{BodyPlan, BodyReader};
use super::error::{Result, S3Error};
use super::list::{self, Entries, Tree, TreeEntry};

/// Top-level directory of the gateway's own files (temporary files, multipart uploads).
pub const RESERVED: &str = ".strata-gateway";
/// Where an object's ETag is kept: `ETAG MTIME_NS LENGTH`.
pub const MD5_XATTR: &[u8] = b"user.strata.md5";
/// Content headers and user metadata of an object (JSON).
pub const META_XATTR: &[u8] = b"user.strata.s3.meta";
/// The key and metadata of a multipart upload (JSON, on its directory).
pub const UPLOAD_XATTR: &[u8] = b"user.strata.s3.upload";
/// The ETag of an empty object (and of a directory marker).
pub const EMPTY_MD5: &str = "d41d8cd98f00b204e9800998ecf8427e";
/// Bytes per read or write call when copying or reading through.
pub const IO_SIZE: u64 = 4 << 20;
/// Temporary files older than this are removed when a gateway starts.
pub const STALE_TMP_SECS: i64 = 3600;
/// rename(2)'s RENAME_NOREPLACE.
const RENAME_NOREPLACE: u32 = 1;
/// Part numbers S3 accepts.
pub const MAX_PART: u32 = 10_000;

/// Headers stored with an object and returned by GET and HEAD: `content-type`,
/// `content-encoding`, `content-disposition`, `content-language`, `cache-control`, `expires`
/// and `x-amz-meta-*`, by lowercase name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StoredMeta(pub BTreeMap<String, String>);

impl StoredMeta {
    /// The headers of a request that are stored with its object.
    pub fn from_headers(h: &http::HeaderMap) -> StoredMeta {
        let mut m = BTreeMap::new();
        for (name, value) in h {
            let n = name.as_str();
            let keep = matches!(
                n,
                "content-type"
                    | "content-disposition"
                    | "content-language"
                    | "cache-control"
                    | "expires"
            ) || n.starts_with("x-amz-meta-");
            if let Ok(v) = value.to_str()
                && keep
            {
                m.insert(n.to_string(), v.to_string());
            }
            if n == "content-encoding"
                && let Ok(v) = value.to_str()
            {
                // `aws-chunked` is how the body was sent, not what the object is.
                let rest: Vec<&str> = v
                    .split(',')
                    .map(str::trim)
                    .filter(|e| !e.is_empty() && !e.eq_ignore_ascii_case("aws-chunked"))
                    .collect();
                if !rest.is_empty() {
                    m.insert(n.to_string(), rest.join(","));
                }
            }
        }
        StoredMeta(m)
    }
}

/// What GET, HEAD and listings say about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub ino: Ino,
    pub size: u64,
    /// Nanoseconds since the epoch.
    pub mtime: i64,
    /// With the quotes.
    pub etag: String,
    pub meta: StoredMeta,
}

/// A key checked and split into path components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub parts: Vec<String>,
    /// The key ends with `/`: it names a directory.
    pub dir: bool,
}

/// Why a key cannot name anything in the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadKey {
    /// `..`, `.`, empty components, a leading `/`, NUL, or the reserved directory.
    Outside,
    TooLong,
}

impl Key {
    pub fn parse(key: &str) -> std::result::Result<Key, BadKey> {
        if key.len() > 1024 {
            return Err(BadKey::TooLong);
        }
        let (body, dir) = match key.strip_suffix('/') {
            Some(b) => (b, true),
            None => (key, false),
        };
        if body.is_empty() || key.contains('\0') {
            return Err(BadKey::Outside);
        }
        let mut parts = Vec::new();
        for p in body.split('/') {
            if p.is_empty() || p == "." || p == ".." {
                return Err(BadKey::Outside);
            }
            if p.len() > crate::meta::MAX_NAME {
                return Err(BadKey::TooLong);
            }
            parts.push(p.to_string());
        }
        if parts[0] == RESERVED {
            return Err(BadKey::Outside);
        }
        Ok(Key { parts, dir })
    }

    /// For reading: a key that names nothing is a missing key.
    pub fn for_read(key: &str) -> Result<Key> {
        Key::parse(key).map_err(|e| match e {
            BadKey::Outside => S3Error::NoSuchKey,
            BadKey::TooLong => S3Error::KeyTooLong,
        })
    }

    /// For writing: a key that cannot be stored is an invalid argument.
    pub fn for_write(key: &str) -> Result<Key> {
        Key::parse(key).map_err(|e| match e {
            BadKey::Outside => S3Error::InvalidArgument(format!(
                "key {key:?} leaves the bucket (empty, '.' or '..' component, leading '/') or is reserved ({RESERVED})"
            )),
            BadKey::TooLong => S3Error::KeyTooLong,
        })
    }

    fn name(&self) -> &[u8] {
        self.parts.last().map(|s| s.as_bytes()).unwrap_or(b"")
    }
}

fn not_found(e: &VfsError) -> bool {
    matches!(e, VfsError::Meta(MetaError::NotFound))
}

/// The ETag of a node whose stored record is `xattr` (if any).
fn etag_of(node: &Node, xattr: Option<&[u8]>) -> String {
    if let Some(v) = xattr.and_then(|v| std::str::from_utf8(v).ok()) {
        let f: Vec<&str> = v.split(' ').collect();
        if let [etag, mtime, len] = f.as_slice()
            && mtime.parse() == Ok(node.mtime)
            && len.parse() == Ok(node.length)
        {
            return format!("\"{etag}\"");
        }
    }
    let h = Md5::digest(format!("{}:{}:{}", node.ino, node.mtime, node.length).as_bytes());
    format!("\"{}-0\"", hex::encode(h))
}

fn random_name() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// A part of a multipart upload as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartInfo {
    pub number: u32,
    pub size: u64,
    pub mtime: i64,
    pub etag: String,
}

/// A CompleteMultipartUpload that passed its checks.
#[derive(Debug)]
pub struct Completion {
    /// `If-None-Match: *`.
    create_only: bool,
    key: Key,
    id: String,
    uploads: Ino,
    dir: Ino,
    meta: StoredMeta,
    /// Inode and info of each part, in order.
    parts: Vec<(Ino, PartInfo)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct UploadRecord {
    key: String,
    meta: StoredMeta,
    initiated: i64,
}

/// The objects of one bucket: the files below `root`.
pub struct Objects {
    vfs: Arc<Vfs>,
    root: Ino,
    ctx: Ctx,
}

impl Objects {
    /// Objects below directory `root` of `vfs`; new files and directories belong to `ctx`.
    pub fn new(vfs: Arc<Vfs>, root: Ino, ctx: Ctx) -> Objects {
        Objects { vfs, root, ctx }
    }

    pub fn vfs(&self) -> &Arc<Vfs> {
        &self.vfs
    }

    fn writable(&self) -> Result<()> {
        if self.vfs.settings.read_only {
            return Err(S3Error::AccessDenied(
                "this gateway is read-only (--read-only)".into(),
            ));
        }
        Ok(())
    }

    /// Through [`Vfs::lookup`], which also imports the listing of an attached directory.
    fn lookup(&self, dir: Ino, name: &[u8]) -> Result<Option<Node>> {
        match self.vfs.lookup(dir, name) {
            Ok(n) => Ok(Some(n)),
            Err(VfsError::Meta(MetaError::NotFound | MetaError::NotDir)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The directory holding `key`'s last component, if every parent exists.
    fn parent_of(&self, key: &Key) -> Result<Option<Ino>> {
        let mut dir = self.root;
        for p in &key.parts[..key.parts.len() - 1] {
            match self.lookup(dir, p.as_bytes())? {
                Some(n) if n.kind == FileKind::Dir => dir = n.ino,
                _ => return Ok(None),
            }
        }
        Ok(Some(dir))
    }

    /// The node a key names: a file, or a directory for a key ending in `/`.
    fn resolve(&self, key: &Key) -> Result<Node> {
        let dir = self.parent_of(key)?.ok_or(S3Error::NoSuchKey)?;
        let n = self.lookup(dir, key.name())?.ok_or(S3Error::NoSuchKey)?;
        let want = if key.dir {
            FileKind::Dir
        } else {
            FileKind::File
        };
        if n.kind != want {
            return Err(S3Error::NoSuchKey);
        }
        Ok(n)
    }

    fn xattr(&self, ino: Ino, name: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.vfs.meta.getxattr(ino, name) {
            Ok(v) => Ok(Some(v)),
            Err(MetaError::NoAttr | MetaError::NotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// What GET and HEAD say about the file or directory `n`.
    pub fn info_of(&self, n: &Node) -> Result<ObjectInfo> {
        if n.kind == FileKind::Dir {
            return Ok(ObjectInfo {
                ino: n.ino,
                size: 0,
                mtime: n.mtime,
                etag: format!("\"{EMPTY_MD5}\""),
                meta: StoredMeta::default(),
            });
        }
        let n = self.vfs.getattr(n.ino)?;
        let md5 = self.xattr(n.ino, MD5_XATTR)?;
        let meta = self
            .xattr(n.ino, META_XATTR)?
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default();
        Ok(ObjectInfo {
            ino: n.ino,
            size: n.length,
            mtime: n.mtime,
            etag: etag_of(&n, md5.as_deref()),
            meta,
        })
    }

    /// Run `f` on the node `key` names. A PUT replacing the key between the lookup and `f`
    /// deletes the node found (nothing held it open yet), and `f` fails (Stale, NotFound):
    /// the key is looked up again, so a reader sees the old or the new object, never a 404.
    fn with_node<T>(&self, key: &Key, f: impl Fn(&Node) -> Result<T>) -> Result<T> {
        let mut attempt = 0;
        loop {
            let n = self.resolve(key)?;
            match f(&n) {
                Err(S3Error::Vfs(e))
                    if (not_found(&e) || matches!(e, VfsError::Stale)) && attempt < 8 =>
                {
                    attempt += 1
                }
                other => return other,
            }
        }
    }

    /// The object at `key`.
    pub fn head(&self, key: &str) -> Result<ObjectInfo> {
        self.with_node(&Key::for_read(key)?, |n| self.info_of(n))
    }

    /// What a listing says about the object of inode `ino`.
    pub fn info(&self, ino: Ino) -> Result<ObjectInfo> {
        let n = self.vfs.getattr(ino)?;
        self.info_of(&n)
    }

    /// Open the object at `key` for reading: its info and a handle (none for a directory).
    /// Once the handle is registered a replacing PUT keeps the node until it is closed, so
    /// the info read after opening belongs to the bytes the handle reads.
    pub fn open(&self, key: &str) -> Result<(ObjectInfo, Option<u64>)> {
        self.with_node(&Key::for_read(key)?, |n| {
            if n.kind == FileKind::Dir {
                return Ok((self.info_of(n)?, None));
            }
            let (fh, _) = self.vfs.open(n.ino, false)?;
            match self.info_of(n) {
                Ok(info) => Ok((info, Some(fh))),
                Err(e) => {
                    self.close(n.ino, fh);
                    Err(e)
                }
            }
        })
    }

    /// Up to `len` bytes at `off` of an open object.
    pub fn read(&self, ino: Ino, fh: u64, off: u64, len: u64) -> Result<Bytes> {
        Ok(self
            .vfs
            .read(ino, fh, off, len.min(u32::MAX as u64) as u32)?)
    }

    pub fn close(&self, ino: Ino, fh: u64) {
        if let Err(e) = self.vfs.release(ino, fh, None) {
            tracing::warn!(volume = %self.vfs.volume(), inode = ino, error = %e, "closing a file read through the gateway failed");
        }
    }

    /// The directory `names` below `dir`, created as needed (another request creating it at
    /// the same time is fine); a component that is a file is a key conflict.
    fn mkdir_p(&self, mut dir: Ino, names: &[String]) -> Result<Ino> {
        for p in names {
            dir = match self.lookup(dir, p.as_bytes())? {
                Some(n) if n.kind == FileKind::Dir => n.ino,
                Some(_) => {
                    return Err(S3Error::KeyConflict(format!(
                        "{p} is an object, so it cannot hold other keys"
                    )));
                }
                None => match self
                    .vfs
                    .mknod(self.ctx, dir, p.as_bytes(), FileKind::Dir, 0o755, 0)
                {
                    Ok(n) => n.ino,
                    Err(VfsError::Meta(MetaError::Exists)) => {
                        match self.lookup(dir, p.as_bytes())? {
                            Some(n) if n.kind == FileKind::Dir => n.ino,
                            _ => {
                                return Err(S3Error::KeyConflict(format!(
                                    "{p} is an object, so it cannot hold other keys"
                                )));
                            }
                        }
                    }
                    Err(e) => return Err(e.into()),
                },
            };
        }
        Ok(dir)
    }

    /// `RESERVED/<sub>`, created if missing.
    fn reserved(&self, sub: &str) -> Result<Ino> {
        self.mkdir_p(self.root, &[RESERVED.to_string(), sub.to_string()])
    }

    /// Check, before receiving a body, that `key` can be stored: no parent is an object.
    fn check_parents(&self, key: &Key) -> Result<()> {
        let mut dir = self.root;
        for p in &key.parts[..key.parts.len() - 1] {
            match self.lookup(dir, p.as_bytes())? {
                Some(n) if n.kind == FileKind::Dir => dir = n.ino,
                Some(_) => {
                    return Err(S3Error::KeyConflict(format!(
                        "{p} is an object, so it cannot hold other keys"
                    )));
                }
                None => return Ok(()),
            }
        }
        if let Some(n) = self.lookup(dir, key.name())?
            && n.kind == FileKind::Dir
            && !key.dir
        {
            return Err(S3Error::KeyConflict(format!(
                "{} holds other keys, so it cannot be an object",
                key.parts.join("/")
            )));
        }
        Ok(())
    }

    /// Write `body` to a new temporary file `dir/name`, checking it against `plan`; store its
    /// ETag record (`etag` given, or the body's MD5) and metadata. Returns the file's inode
    /// and ETag. The file is removed again if anything fails.
    fn write_temp<I>(
        &self,
        dir: Ino,
        name: &str,
        body: I,
        plan: BodyPlan,
        meta: &StoredMeta,
    ) -> Result<(Ino, String)>
    where
        I: Iterator<Item = Result<Bytes>>,
    {
        let (node, fh) = self.vfs.create(self.ctx, dir, name.as_bytes(), 0o644)?;
        let ino = node.ino;
        let res = self.fill(ino, body, plan);
        let closed = self.vfs.release(ino, fh, None);
        let res = res.and_then(|md5| closed.map(|_| md5).map_err(S3Error::from));
        let res = res.and_then(|md5| {
            let etag = hex::encode(md5);
            self.store_record(ino, &etag, meta)?;
            Ok(etag)
        });
        match res {
            Ok(etag) => Ok((ino, etag)),
            Err(e) => {
                let _ = self.vfs.unlink(dir, name.as_bytes());
                Err(e)
            }
        }
    }

    /// Write the body into file `ino`, flush it, make it durable; the body's MD5.
    fn fill<I>(&self, ino: Ino, body: I, plan: BodyPlan) -> Result<[u8; 16]>
    where
        I: Iterator<Item = Result<Bytes>>,
    {
        let mut reader = BodyReader::new(plan);
        let mut off = 0u64;
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        let mut out = Vec::new();
        for raw in body {
            reader.feed(raw?, &mut out)?;
            for piece in out.drain(..) {
                if buf.is_empty() && piece.len() >= 1 << 20 {
                    self.vfs.write(ino, off, &piece)?;
                    off += piece.len() as u64;
                    continue;
                }
                buf.extend_from_slice(&piece);
                if buf.len() >= 1 << 20 {
                    self.vfs.write(ino, off, &buf)?;
                    off += buf.len() as u64;
                    buf.clear();
                }
            }
        }
        let digest = reader.finish()?;
        if !buf.is_empty() {
            self.vfs.write(ino, off, &buf)?;
        }
        self.vfs.fsync(ino)?;
        Ok(digest.md5)
    }

    /// Store the ETag record (valid for the file as it is now) and the metadata.
    fn store_record(&self, ino: Ino, etag: &str, meta: &StoredMeta) -> Result<()> {
        let n = self.vfs.getattr(ino)?;
        let record = format!("{etag} {} {}", n.mtime, n.length);
        self.vfs.setxattr(ino, MD5_XATTR, record.as_bytes(), 0)?;
        if !meta.0.is_empty() {
            let v = serde_json::to_vec(meta).map_err(|e| S3Error::Internal(e.to_string()))?;
            self.vfs.setxattr(ino, META_XATTR, &v, 0)?;
        }
        Ok(())
    }

    /// Move temporary file `tmpdir/tmp` to `key`, creating parent directories (again, if a
    /// concurrent delete pruned them meanwhile). `create_only` (`If-None-Match: *`): fail
    /// if the key exists, atomically (RENAME_NOREPLACE).
    fn place(&self, tmpdir: Ino, tmp: &str, key: &Key, create_only: bool) -> Result<()> {
        let parents = &key.parts[..key.parts.len() - 1];
        let flags = if create_only { RENAME_NOREPLACE } else { 0 };
        let mut attempt = 0;
        loop {
            let dir = self.mkdir_p(self.root, parents)?;
            match self
                .vfs
                .rename(tmpdir, tmp.as_bytes(), dir, key.name(), flags)
            {
                Ok(()) => return Ok(()),
                Err(e) if not_found(&e) && attempt < 3 => attempt += 1,
                Err(VfsError::Meta(MetaError::Exists)) if create_only => {
                    return Err(S3Error::PreconditionFailed);
                }
                Err(VfsError::Meta(MetaError::IsDir | MetaError::NotEmpty)) => {
                    return Err(S3Error::KeyConflict(format!(
                        "{} holds other keys, so it cannot be an object",
                        key.parts.join("/")
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The checks of a PUT that need no body: the gateway is writable, the key can be
    /// stored. Run before the body is read, so that a refused upload is not sent in vain.
    /// With `create_only`, an existing object fails the request here already.
    pub fn check_put(&self, key: &str, create_only: bool) -> Result<()> {
        self.writable()?;
        let k = Key::for_write(key)?;
        self.check_parents(&k)?;
        if create_only {
            self.check_absent(&k)?;
        }
        Ok(())
    }

    /// `If-None-Match: *`: the key must not name an object yet.
    fn check_absent(&self, k: &Key) -> Result<()> {
        match self.resolve(k) {
            Ok(_) => Err(S3Error::PreconditionFailed),
            Err(S3Error::NoSuchKey) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The checks of UploadPart that need no body.
    pub fn check_upload(&self, id: &str, key: &str) -> Result<()> {
        self.writable()?;
        self.upload_dir(id, key).map(|_| ())
    }

    /// When the bucket's directory last changed (ListBuckets' CreationDate: the volume keeps
    /// no creation time).
    pub fn root_created(&self) -> Result<i64> {
        Ok(self.vfs.getattr(self.root)?.ctime)
    }

    /// PutObject: store `body` at `key`. A key ending in `/` with an empty body makes a
    /// directory. `create_only` (`If-None-Match: *`): only if the key names no object.
    pub fn put<I>(
        &self,
        key: &str,
        body: I,
        plan: BodyPlan,
        meta: &StoredMeta,
        create_only: bool,
    ) -> Result<ObjectInfo>
    where
        I: Iterator<Item = Result<Bytes>>,
    {
        self.writable()?;
        let k = Key::for_write(key)?;
        self.check_parents(&k)?;
        if k.dir {
            let mut reader = BodyReader::new(plan);
            let mut out = Vec::new();
            for raw in body {
                reader.feed(raw?, &mut out)?;
            }
            if reader.finish()?.len != 0 {
                return Err(S3Error::InvalidArgument(
                    "a key ending in '/' names a directory: its body must be empty".into(),
                ));
            }
            let d = self.mkdir_p(self.root, &k.parts)?;
            return self.info(d);
        }
        let tmpdir = self.reserved("tmp")?;
        let tmp = random_name();
        let (ino, _) = self.write_temp(tmpdir, &tmp, body, plan, meta)?;
        if let Err(e) = self.place(tmpdir, &tmp, &k, create_only) {
            let _ = self.vfs.unlink(tmpdir, tmp.as_bytes());
            return Err(e);
        }
        self.info(ino)
    }

    /// CopyObject: `dst` gets the bytes of `src`, and `meta` (or the source's metadata).
    pub fn copy(&self, src: &str, dst: &str, meta: Option<StoredMeta>) -> Result<ObjectInfo> {
        self.writable()?;
        let dk = Key::for_write(dst)?;
        let (info, fh) = self.open(src)?;
        let Some(fh) = fh else {
            // A directory marker: copying it makes another directory.
            let d = self.mkdir_p(self.root, &dk.parts)?;
            return self.info(d);
        };
        let sk = Key::for_read(src)?;
        let res = (|| {
            if sk == dk {
                let Some(m) = meta.clone() else {
                    return Err(S3Error::InvalidRequest(
                        "copying an object to itself needs x-amz-metadata-directive: REPLACE"
                            .into(),
                    ));
                };
                let n = self.vfs.getattr(info.ino)?;
                let md5 = self.xattr(info.ino, MD5_XATTR)?;
                let etag = etag_of(&n, md5.as_deref());
                self.store_record(info.ino, etag.trim_matches('"'), &m)?;
                return self.info(info.ino);
            }
            self.check_parents(&dk)?;
            let meta = meta.unwrap_or_else(|| info.meta.clone());
            let tmpdir = self.reserved("tmp")?;
            let tmp = random_name();
            let reader = FileChunks::new(self, info.ino, fh, info.size);
            let (ino, _) = self.write_temp(tmpdir, &tmp, reader, BodyPlan::plain(), &meta)?;
            if let Err(e) = self.place(tmpdir, &tmp, &dk, false) {
                let _ = self.vfs.unlink(tmpdir, tmp.as_bytes());
                return Err(e);
            }
            self.info(ino)
        })();
        self.close(info.ino, fh);
        res
    }

    /// DeleteObject: remove the object (a missing key is not an error), then the
    /// directories above it left empty.
    pub fn delete(&self, key: &str) -> Result<()> {
        self.writable()?;
        let k = Key::for_write(key)?;
        // The directories down to the key, to prune afterwards.
        let mut chain: Vec<(Ino, &str)> = Vec::new();
        let mut dir = self.root;
        for p in &k.parts[..k.parts.len() - 1] {
            match self.lookup(dir, p.as_bytes())? {
                Some(n) if n.kind == FileKind::Dir => {
                    chain.push((dir, p.as_str()));
                    dir = n.ino;
                }
                _ => return Ok(()),
            }
        }
        let Some(n) = self.lookup(dir, k.name())? else {
            return Ok(());
        };
        let res = match (n.kind, k.dir) {
            (FileKind::File, false) => self.vfs.unlink(dir, k.name()),
            (FileKind::Dir, true) => {
                chain.push((dir, k.parts.last().map(String::as_str).unwrap_or("")));
                Ok(())
            }
            _ => return Ok(()),
        };
        match res {
            Ok(()) => {}
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
        // Prune empty directories, deepest first; stop at the first that is not empty.
        for (parent, name) in chain.iter().rev() {
            match self.vfs.rmdir(*parent, name.as_bytes()) {
                Ok(()) => {}
                Err(e) if not_found(&e) => {}
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// One page of the listing of the bucket.
    pub fn list(&self, q: list::Query) -> Result<list::Page> {
        let tree = VfsTree {
            vfs: &self.vfs,
            root: self.root,
        };
        list::list(&tree, self.root, q)
    }

    // ---------------------------------------------------------------- multipart uploads

    fn upload_dir(&self, id: &str, key: &str) -> Result<(Ino, Ino, UploadRecord)> {
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(S3Error::NoSuchUpload);
        }
        let uploads = self
            .lookup(self.root, RESERVED.as_bytes())?
            .and_then(|r| self.lookup(r.ino, b"uploads").transpose())
            .transpose()?
            .ok_or(S3Error::NoSuchUpload)?;
        let dir = self
            .lookup(uploads.ino, id.as_bytes())?
            .ok_or(S3Error::NoSuchUpload)?;
        let rec: UploadRecord = self
            .xattr(dir.ino, UPLOAD_XATTR)?
            .and_then(|v| serde_json::from_slice(&v).ok())
            .ok_or(S3Error::NoSuchUpload)?;
        if rec.key != key {
            return Err(S3Error::NoSuchUpload);
        }
        Ok((uploads.ino, dir.ino, rec))
    }

    /// CreateMultipartUpload: the upload id.
    pub fn create_upload(&self, key: &str, meta: StoredMeta) -> Result<String> {
        self.writable()?;
        let k = Key::for_write(key)?;
        if k.dir {
            return Err(S3Error::InvalidArgument(
                "a key ending in '/' cannot be uploaded in parts".into(),
            ));
        }
        self.check_parents(&k)?;
        let uploads = self.reserved("uploads")?;
        let id = random_name();
        let dir = self
            .vfs
            .mknod(self.ctx, uploads, id.as_bytes(), FileKind::Dir, 0o755, 0)?;
        let rec = UploadRecord {
            key: key.to_string(),
            meta,
            initiated: dir.mtime,
        };
        let v = serde_json::to_vec(&rec).map_err(|e| S3Error::Internal(e.to_string()))?;
        self.vfs.setxattr(dir.ino, UPLOAD_XATTR, &v, 0)?;
        Ok(id)
    }

    fn part_name(n: u32) -> String {
        format!("part-{n:05}")
    }

    fn check_part_number(n: u32) -> Result<()> {
        if !(1..=MAX_PART).contains(&n) {
            return Err(S3Error::InvalidArgument(format!(
                "part number {n} is not between 1 and {MAX_PART}"
            )));
        }
        Ok(())
    }

    /// UploadPart: store part `n`; its ETag (with quotes) and size.
    pub fn upload_part<I>(
        &self,
        id: &str,
        key: &str,
        n: u32,
        body: I,
        plan: BodyPlan,
    ) -> Result<(String, u64)>
    where
        I: Iterator<Item = Result<Bytes>>,
    {
        self.writable()?;
        Self::check_part_number(n)?;
        let (_, dir, _) = self.upload_dir(id, key)?;
        let info = self.store_part(dir, n, body, plan)?;
        Ok((info.etag, info.size))
    }

    /// Write part `n` of the upload in `dir` (a temporary name, then the part's).
    fn store_part<I>(&self, dir: Ino, n: u32, body: I, plan: BodyPlan) -> Result<PartInfo>
    where
        I: Iterator<Item = Result<Bytes>>,
    {
        let tmp = format!(".tmp-{n}-{}", random_name());
        let (ino, _) = self.write_temp(dir, &tmp, body, plan, &StoredMeta::default())?;
        let part = Self::part_name(n);
        if let Err(e) = self
            .vfs
            .rename(dir, tmp.as_bytes(), dir, part.as_bytes(), 0)
        {
            let _ = self.vfs.unlink(dir, tmp.as_bytes());
            // Aborted meanwhile.
            return Err(if not_found(&e) {
                S3Error::NoSuchUpload
            } else {
                e.into()
            });
        }
        let info = self.info(ino)?;
        Ok(PartInfo {
            number: n,
            size: info.size,
            mtime: info.mtime,
            etag: info.etag,
        })
    }

    /// UploadPartCopy: part `n` is the bytes `[start, end)` of object `src` (all of it
    /// without a range).
    pub fn upload_part_copy(
        &self,
        id: &str,
        key: &str,
        n: u32,
        src: &str,
        range: Option<(u64, u64)>,
    ) -> Result<PartInfo> {
        self.writable()?;
        Self::check_part_number(n)?;
        let (_, dir, _) = self.upload_dir(id, key)?;
        let (info, fh) = self.open(src)?;
        let Some(fh) = fh else {
            return Err(S3Error::InvalidArgument(
                "the copy source is a directory".into(),
            ));
        };
        let (start, end) = range.unwrap_or((0, info.size));
        let chunks = FileChunks::range(self, info.ino, fh, start, end.min(info.size));
        let res = self.store_part(dir, n, chunks, BodyPlan::plain());
        self.close(info.ino, fh);
        res
    }

    fn part(&self, dir: Ino, n: u32) -> Result<Option<(Node, PartInfo)>> {
        let Some(node) = self.lookup(dir, Self::part_name(n).as_bytes())? else {
            return Ok(None);
        };
        let info = self.info_of(&node)?;
        Ok(Some((
            node,
            PartInfo {
                number: n,
                size: info.size,
                mtime: info.mtime,
                etag: info.etag,
            },
        )))
    }

    /// ListParts: the parts after part number `marker`, at most `max`; and whether more
    /// follow.
    pub fn list_parts(
        &self,
        id: &str,
        key: &str,
        marker: u32,
        max: usize,
    ) -> Result<(Vec<PartInfo>, bool)> {
        let (_, dir, _) = self.upload_dir(id, key)?;
        let mut parts = Vec::new();
        let after = Self::part_name(marker);
        let mut from = Some(after.into_bytes());
        loop {
            let page = self.vfs.meta.readdir(dir, from.as_deref(), 1000)?;
            for e in &page {
                let name = String::from_utf8_lossy(&e.name);
                let Some(n) = name
                    .strip_prefix("part-")
                    .and_then(|d| d.parse::<u32>().ok())
                else {
                    continue;
                };
                if let Some((_, info)) = self.part(dir, n)? {
                    if parts.len() == max {
                        return Ok((parts, true));
                    }
                    parts.push(info);
                }
            }
            match page.last() {
                Some(l) if page.len() == 1000 => from = Some(l.name.clone()),
                _ => return Ok((parts, false)),
            }
        }
    }

    /// The checks of CompleteMultipartUpload (the parts exist with these ETags, in
    /// ascending order), before anything is copied.
    pub fn check_complete(
        &self,
        id: &str,
        key: &str,
        parts: &[(u32, String)],
        create_only: bool,
    ) -> Result<Completion> {
        self.writable()?;
        let k = Key::for_write(key)?;
        self.check_parents(&k)?;
        if create_only {
            self.check_absent(&k)?;
        }
        let (uploads, dir, rec) = self.upload_dir(id, key)?;
        if parts.is_empty() {
            return Err(S3Error::MalformedXml("no parts listed".into()));
        }
        let mut chosen = Vec::with_capacity(parts.len());
        let mut last = 0;
        for (n, etag) in parts {
            Self::check_part_number(*n)?;
            if *n <= last {
                return Err(S3Error::InvalidPartOrder);
            }
            last = *n;
            let (node, info) = self
                .part(dir, *n)?
                .ok_or_else(|| S3Error::InvalidPart(format!("part {n} was not uploaded")))?;
            if info.etag.trim_matches('"') != etag.trim().trim_matches('"') {
                return Err(S3Error::InvalidPart(format!(
                    "part {n} has ETag {}, not {etag}",
                    info.etag
                )));
            }
            chosen.push((node.ino, info));
        }
        Ok(Completion {
            create_only,
            key: k,
            id: id.to_string(),
            uploads,
            dir,
            meta: rec.meta,
            parts: chosen,
        })
    }

    /// The rest of CompleteMultipartUpload: concatenate the checked parts into the object
    /// (`progress` is called after each piece copied: the server sends keep-alive bytes from
    /// it), then remove the upload. The ETag is the MD5 of the parts' MD5s, `-N`.
    pub fn assemble(&self, c: &Completion, progress: &dyn Fn()) -> Result<ObjectInfo> {
        let mut md5s = Md5::new();
        for (_, p) in &c.parts {
            let raw = hex::decode(p.etag.trim_matches('"')).unwrap_or_default();
            md5s.update(&raw);
        }
        let etag = format!("{}-{}", hex::encode(md5s.finalize()), c.parts.len());
        let tmpdir = self.reserved("tmp")?;
        let tmp = random_name();
        let (node, fh) = self.vfs.create(self.ctx, tmpdir, tmp.as_bytes(), 0o644)?;
        let ino = node.ino;
        let res = (|| {
            let mut off = 0u64;
            for (part, p) in &c.parts {
                let (pfh, _) = self.vfs.open(*part, false)?;
                let copied = (|| {
                    for piece in FileChunks::new(self, *part, pfh, p.size) {
                        let piece = piece?;
                        self.vfs.write(ino, off, &piece)?;
                        off += piece.len() as u64;
                        progress();
                    }
                    Ok::<_, S3Error>(())
                })();
                self.close(*part, pfh);
                copied?;
            }
            self.vfs.fsync(ino)?;
            Ok::<_, S3Error>(())
        })();
        let closed = self.vfs.release(ino, fh, None);
        let res = res
            .and_then(|_| closed.map_err(S3Error::from))
            .and_then(|_| self.store_record(ino, &etag, &c.meta))
            .and_then(|_| self.place(tmpdir, &tmp, &c.key, c.create_only));
        if let Err(e) = res {
            let _ = self.vfs.unlink(tmpdir, tmp.as_bytes());
            return Err(e);
        }
        self.remove_upload(c.uploads, &c.id, c.dir);
        self.info(ino)
    }

    /// AbortMultipartUpload.
    pub fn abort_upload(&self, id: &str, key: &str) -> Result<()> {
        self.writable()?;
        let (uploads, dir, _) = self.upload_dir(id, key)?;
        self.remove_upload(uploads, id, dir);
        Ok(())
    }

    /// Remove upload `id` (directory `dir` in `uploads`) and its parts.
    fn remove_upload(&self, uploads: Ino, id: &str, dir: Ino) {
        let res = (|| {
            loop {
                let page = self.vfs.meta.readdir(dir, None, 1000)?;
                if page.is_empty() {
                    break;
                }
                for e in page {
                    match self.vfs.unlink(dir, &e.name) {
                        Ok(()) => {}
                        Err(e) if not_found(&e) => {}
                        Err(e) => return Err(S3Error::from(e)),
                    }
                }
            }
            match self.vfs.rmdir(uploads, id.as_bytes()) {
                Ok(()) => Ok(()),
                Err(e) if not_found(&e) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })();
        if let Err(e) = res {
            tracing::warn!(volume = %self.vfs.volume(), upload = id, error = %e, "removing a multipart upload failed");
        }
    }

    /// Remove temporary files left by gateways that died while writing (older than
    /// [`STALE_TMP_SECS`]: a file being written is flushed every few seconds).
    pub fn clean_stale_temp(&self, now_ns: i64) -> Result<usize> {
        if self.vfs.settings.read_only {
            return Ok(0);
        }
        let Some(r) = self.lookup(self.root, RESERVED.as_bytes())? else {
            return Ok(0);
        };
        let Some(tmp) = self.lookup(r.ino, b"tmp")? else {
            return Ok(0);
        };
        let mut removed = 0;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self.vfs.meta.readdir(tmp.ino, after.as_deref(), 1000)?;
            for e in &page {
                if let Ok(n) = self.vfs.meta.getattr(e.ino)
                    && now_ns - n.mtime > STALE_TMP_SECS * 1_000_000_000
                    && self.vfs.unlink(tmp.ino, &e.name).is_ok()
                {
                    removed += 1;
                }
            }
            match page.last() {
                Some(l) if page.len() == 1000 => after = Some(l.name.clone()),
                _ => return Ok(removed),
            }
        }
    }
}

/// The bytes of an open file, [`IO_SIZE`] at a time (aligned to it).
pub struct FileChunks<'a> {
    objects: &'a Objects,
    ino: Ino,
    fh: u64,
    off: u64,
    end: u64,
}

impl<'a> FileChunks<'a> {
    pub fn new(objects: &'a Objects, ino: Ino, fh: u64, size: u64) -> FileChunks<'a> {
        Self::range(objects, ino, fh, 0, size)
    }

    /// The bytes `[start, end)`.
    pub fn range(objects: &'a Objects, ino: Ino, fh: u64, start: u64, end: u64) -> FileChunks<'a> {
        FileChunks {
            objects,
            ino,
            fh,
            off: start,
            end,
        }
    }
}

impl Iterator for FileChunks<'_> {
    type Item = Result<Bytes>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.off >= self.end {
            return None;
        }
        let n = (IO_SIZE - self.off % IO_SIZE).min(self.end - self.off);
        match self.objects.read(self.ino, self.fh, self.off, n) {
            Ok(b) if b.is_empty() => {
                self.off = self.end;
                Some(Err(S3Error::Internal(format!(
                    "inode {} is shorter than its length",
                    self.ino
                ))))
            }
            Ok(b) => {
                self.off += b.len() as u64;
                Some(Ok(b))
            }
            Err(e) => {
                self.off = self.end;
                Some(Err(e))
            }
        }
    }
}

/// The listing's view of the volume: regular files are objects, directories are walked;
/// other kinds, names that are not UTF-8, and the reserved directory are left out.
struct VfsTree<'a> {
    vfs: &'a Vfs,
    root: Ino,
}

impl VfsTree<'_> {
    fn keep(&self, dir: Ino, name: &[u8], kind: FileKind) -> bool {
        matches!(kind, FileKind::File | FileKind::Dir)
            && std::str::from_utf8(name).is_ok()
            && name != b"."
            && name != b".."
            && !(dir == self.root && name == RESERVED.as_bytes())
    }
}

impl Tree for VfsTree<'_> {
    fn entries(&self, dir: u64, after: Option<&[u8]>, limit: usize) -> Result<Entries> {
        // A lookup in the directory first: it imports the listing of a directory of an
        // attached source (`strata attach`) as a mount's lookups do; the pages are then
        // read from the metadata engine.
        match self.vfs.lookup(dir, b".") {
            Ok(_) => {}
            // Removed while the listing walked it: nothing there.
            Err(VfsError::Meta(MetaError::NotFound | MetaError::NotDir)) => {
                return Ok(Entries::default());
            }
            Err(e) => return Err(e.into()),
        }
        let page = match self.vfs.meta.readdir(dir, after, limit) {
            Ok(p) => p,
            Err(MetaError::NotFound | MetaError::NotDir) => return Ok(Entries::default()),
            Err(e) => return Err(e.into()),
        };
        let next = (page.len() == limit)
            .then(|| page.last().map(|e| e.name.clone()))
            .flatten();
        let entries = page
            .into_iter()
            .filter(|e| self.keep(dir, &e.name, e.kind))
            .map(|e| TreeEntry {
                name: e.name,
                id: e.ino,
                dir: e.kind == FileKind::Dir,
            })
            .collect();
        Ok(Entries { entries, next })
    }

    fn lookup(&self, dir: u64, name: &[u8]) -> Result<Option<TreeEntry>> {
        if name.is_empty() || name.contains(&b'/') {
            return Ok(None);
        }
        match self.vfs.lookup(dir, name) {
            Ok(n) if self.keep(dir, name, n.kind) => Ok(Some(TreeEntry {
                name: name.to_vec(),
                id: n.ino,
                dir: n.kind == FileKind::Dir,
            })),
            Ok(_)
            | Err(VfsError::Meta(
                MetaError::NotFound | MetaError::NotDir | MetaError::NameTooLong,
            )) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_leave_the_bucket_are_refused() {
        for bad in [
            "../x",
            "a/../../x",
            "/abs",
            "a//b",
            "./a",
            "a/./b",
            "",
            "/",
            "a\0b",
            ".strata-gateway/tmp/x",
        ] {
            assert_eq!(Key::parse(bad), Err(BadKey::Outside), "{bad:?}");
            assert_eq!(Key::for_read(bad).unwrap_err().code(), "NoSuchKey");
            assert_eq!(Key::for_write(bad).unwrap_err().code(), "InvalidArgument");
        }
        assert_eq!(Key::parse(&"a".repeat(1025)), Err(BadKey::TooLong));
        assert_eq!(Key::parse(&"a".repeat(256)), Err(BadKey::TooLong));
        assert_eq!(
            Key::parse("a/b c/d..e").unwrap(),
            Key {
                parts: vec!["a".into(), "b c".into(), "d..e".into()],
                dir: false
            }
        );
        assert_eq!(
            Key::parse("dir/sub/").unwrap(),
            Key {
                parts: vec!["dir".into(), "sub".into()],
                dir: true
            }
        );
        assert!(Key::parse(".strata-gateway-not-reserved").is_ok());
    }

    #[test]
    fn stored_etag_is_used_only_while_the_file_is_unchanged() {
        let mut n = Node {
            ino: 7,
            kind: FileKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            atime: 0,
            mtime: 1_000,
            ctime: 0,
            nlink: 1,
            length: 5,
            rdev: 0,
            parent: 1,
            seq: 0,
            masks: vec![],
        };
        let rec = b"0123456789abcdef0123456789abcdef 1000 5";
        assert_eq!(
            etag_of(&n, Some(rec)),
            "\"0123456789abcdef0123456789abcdef\""
        );
        let weak = etag_of(&n, None);
        assert!(weak.ends_with("-0\"") && weak.len() == 36, "{weak}");
        assert_eq!(weak, etag_of(&n, None), "stable");
        n.mtime = 2_000;
        let changed = etag_of(&n, Some(rec));
        assert!(changed.ends_with("-0\""), "a changed file: {changed}");
        assert_ne!(changed, weak, "the weak ETag changes with the file");
    }

    #[test]
    fn stored_metadata_keeps_content_headers_and_user_metadata_only() {
        let mut h = http::HeaderMap::new();
        h.insert("content-type", "text/plain".parse().unwrap());
        h.insert("content-encoding", "aws-chunked,gzip".parse().unwrap());
        h.insert("x-amz-meta-mtime", "1700000000".parse().unwrap());
        h.insert("authorization", "secret".parse().unwrap());
        h.insert("x-amz-content-sha256", "UNSIGNED-PAYLOAD".parse().unwrap());
        let m = StoredMeta::from_headers(&h);
        let got: Vec<(&str, &str)> = m.0.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            got,
            vec![
                ("content-encoding", "gzip"),
                ("content-type", "text/plain"),
                ("x-amz-meta-mtime", "1700000000")
            ]
        );
        h.insert("content-encoding", "aws-chunked".parse().unwrap());
        assert!(
            !StoredMeta::from_headers(&h)
                .0
                .contains_key("content-encoding")
        );
    }
}
