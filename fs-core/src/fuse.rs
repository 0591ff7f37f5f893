//! The FUSE adapter: translates `fuser` requests into [`Vfs`] calls. This is the one place
//! where errors become errno values ([`errno_of`]). Every operation runs in a tracing span,
//! is counted and timed in the metrics, and failures or slow operations are logged with the
//! path and the volume.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};

use crate::meta::{Ctx, FileKind, Ino, MetaError, Node, ROOT_INO, SetAttr, TimeSet};
use crate::vfs::reader::FetchError;
use crate::vfs::writer::FlushError;
use crate::vfs::{Vfs, VfsError};

/// The errno for an error of the file-system core.
pub fn errno_of(e: &VfsError) -> i32 {
    match e {
        VfsError::Meta(m) => match m {
            MetaError::NotFound => libc::ENOENT,
            MetaError::Exists => libc::EEXIST,
            MetaError::NotDir => libc::ENOTDIR,
            MetaError::IsDir => libc::EISDIR,
            MetaError::NotEmpty => libc::ENOTEMPTY,
            MetaError::Perm => libc::EPERM,
            MetaError::Access => libc::EACCES,
            MetaError::Invalid(_) => libc::EINVAL,
            MetaError::NameTooLong => libc::ENAMETOOLONG,
            MetaError::NoSpace => libc::ENOSPC,
            MetaError::NoAttr => libc::ENODATA,
            MetaError::Range => libc::ERANGE,
            MetaError::TooManyLinks => libc::EMLINK,
            MetaError::NotSupported(_) => libc::EOPNOTSUPP,
            MetaError::TooBig => libc::EFBIG,
            MetaError::Quota => libc::EDQUOT,
            MetaError::CrossQuota => libc::EXDEV,
            MetaError::ReadOnlySource => libc::EROFS,
            MetaError::Conflict
            | MetaError::NotFormatted(_)
            | MetaError::Format(_)
            | MetaError::Engine(_) => libc::EIO,
        },
        VfsError::Fetch(
            FetchError::Missing(_)
            | FetchError::Corrupt { .. }
            | FetchError::Store(_)
            | FetchError::Changed(_),
        ) => libc::EIO,
        VfsError::Source(_) => libc::EIO,
        VfsError::Flush(FlushError::Meta(MetaError::NoSpace)) => libc::ENOSPC,
        VfsError::Flush(FlushError::Meta(MetaError::Quota)) => libc::EDQUOT,
        VfsError::Flush(_) => libc::EIO,
        VfsError::ReadOnly => libc::EROFS,
        VfsError::BadHandle => libc::EBADF,
        VfsError::Cache(_) => libc::EIO,
    }
}

/// Errors that are part of normal operation and not worth a log line.
fn expected(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENOENT | libc::EEXIST | libc::ENODATA | libc::ENOTEMPTY | libc::ERANGE | libc::EROFS
    )
}

const SLOW: Duration = Duration::from_secs(1);
const GENERATION: Generation = Generation(0);

/// Mount options the adapter needs.
#[derive(Debug, Clone)]
pub struct MountSettings {
    /// Shown as the mount's source in /proc/mounts.
    pub fsname: String,
    /// FUSE worker threads.
    pub threads: usize,
    pub read_only: bool,
    pub allow_other: bool,
}

pub struct StrataFs {
    vfs: Arc<Vfs>,
    /// Real inode shown as the mount's root (`--subdir`).
    root: Ino,
    attr_ttl: Duration,
    entry_ttl: Duration,
    dir_entry_ttl: Duration,
}

fn to_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn from_time(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(from_time(t)),
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::BlockDev => FileType::BlockDevice,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::Socket => FileType::Socket,
    }
}

impl StrataFs {
    pub fn new(vfs: Arc<Vfs>, root: Ino) -> Self {
        let attr_ttl = Duration::from_secs_f64(vfs.settings.attr_timeout.max(0.0));
        let entry_ttl = Duration::from_secs_f64(vfs.settings.entry_timeout.max(0.0));
        let dir_entry_ttl = Duration::from_secs_f64(vfs.settings.dir_entry_timeout.max(0.0));
        StrataFs {
            vfs,
            root,
            attr_ttl,
            entry_ttl,
            dir_entry_ttl,
        }
    }

    /// Kernel inode → file-system inode (the mount root and the real root swap places).
    fn real(&self, ino: INodeNo) -> Ino {
        let i = ino.0;
        if i == ROOT_INO {
            self.root
        } else if i == self.root {
            ROOT_INO
        } else {
            i
        }
    }

    fn kernel(&self, ino: Ino) -> INodeNo {
        INodeNo(if ino == self.root {
            ROOT_INO
        } else if ino == ROOT_INO {
            self.root
        } else {
            ino
        })
    }

    fn attr(&self, n: &Node) -> FileAttr {
        FileAttr {
            ino: self.kernel(n.ino),
            size: n.length,
            blocks: n.length.div_ceil(512),
            atime: to_time(n.atime),
            mtime: to_time(n.mtime),
            ctime: to_time(n.ctime),
            crtime: to_time(n.ctime),
            kind: file_type(n.kind),
            perm: (n.mode & 0o7777) as u16,
            nlink: n.nlink,
            uid: n.uid,
            gid: n.gid,
            // Non-zero on files and directories of attached sources (their mark, not a
            // device number).
            rdev: if matches!(n.kind, FileKind::BlockDev | FileKind::CharDev) {
                n.rdev
            } else {
                0
            },
            blksize: 1 << 20,
            flags: 0,
        }
    }

    /// Record an operation; log it with its path when it failed unexpectedly or was slow.
    fn finish(
        &self,
        op: &'static str,
        start: Instant,
        err: Option<&VfsError>,
        path: impl Fn() -> String,
    ) -> Option<Errno> {
        let elapsed = start.elapsed();
        let errno = err.map(errno_of);
        self.vfs.metrics.fuse_op(op, elapsed, errno);
        if let (Some(e), Some(no)) = (err, errno) {
            if !expected(no) {
                tracing::warn!(volume = %self.vfs.volume(), op, path = %path(), errno = no, error = %e, "operation failed");
            }
        } else if elapsed > SLOW {
            tracing::warn!(volume = %self.vfs.volume(), op, path = %path(), secs = elapsed.as_secs_f64(), "slow operation");
        }
        errno.map(Errno::from_i32)
    }

    /// Record the outcome of an operation (metrics, logs) and turn an error into its errno.
    fn outcome<T>(
        &self,
        op: &'static str,
        start: Instant,
        r: Result<T, VfsError>,
        path: impl Fn() -> String,
    ) -> Result<T, Errno> {
        match r {
            Ok(v) => {
                self.finish(op, start, None, path);
                Ok(v)
            }
            Err(e) => Err(self.finish(op, start, Some(&e), path).unwrap_or(Errno::EIO)),
        }
    }

    fn reply_entry(
        &self,
        op: &'static str,
        start: Instant,
        r: Result<Node, VfsError>,
        path: impl Fn() -> String,
        reply: ReplyEntry,
    ) {
        match self.outcome(op, start, r, path) {
            Ok(n) => {
                let ttl = if n.kind == crate::meta::FileKind::Dir {
                    &self.dir_entry_ttl
                } else {
                    &self.entry_ttl
                };
                reply.entry_with_ttls(&self.attr_ttl, ttl, &self.attr(&n), GENERATION)
            }
            Err(no) => reply.error(no),
        }
    }

    fn reply_empty(
        &self,
        op: &'static str,
        start: Instant,
        r: Result<(), VfsError>,
        path: impl Fn() -> String,
        reply: ReplyEmpty,
    ) {
        match self.outcome(op, start, r, path) {
            Ok(()) => reply.ok(),
            Err(no) => reply.error(no),
        }
    }

    fn reply_attr(
        &self,
        op: &'static str,
        start: Instant,
        r: Result<Node, VfsError>,
        path: impl Fn() -> String,
        reply: ReplyAttr,
    ) {
        match self.outcome(op, start, r, path) {
            Ok(n) => reply.attr(&self.attr_ttl, &self.attr(&n)),
            Err(no) => reply.error(no),
        }
    }
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
    }
}

impl Filesystem for StrataFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(4 << 20);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.add_capabilities(InitFlags::FUSE_CACHE_SYMLINKS);
        // Locks go through the metadata engine so they exclude across clients.
        let _ = config.add_capabilities(InitFlags::FUSE_POSIX_LOCKS);
        let _ = config.add_capabilities(InitFlags::FUSE_FLOCK_LOCKS);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let start = Instant::now();
        let p = self.real(parent);
        let _s = tracing::debug_span!("lookup", parent = p).entered();
        let r = self.vfs.lookup(p, name.as_bytes());
        self.reply_entry(
            "lookup",
            start,
            r,
            || self.vfs.path_of(p, name.as_bytes()),
            reply,
        );
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let start = Instant::now();
        let i = self.real(ino);
        let _s = tracing::debug_span!("getattr", ino = i).entered();
        let r = self.vfs.getattr(i);
        self.reply_attr("getattr", start, r, || self.vfs.path(i), reply);
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let start = Instant::now();
        let i = self.real(ino);
        let _s = tracing::debug_span!("setattr", ino = i, size).entered();
        let set = SetAttr {
            mode,
            uid,
            gid,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
        };
        let r = self.vfs.setattr(i, &set, size);
        self.reply_attr("setattr", start, r, || self.vfs.path(i), reply);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let start = Instant::now();
        let i = self.real(ino);
        match self.outcome("readlink", start, self.vfs.readlink(i), || self.vfs.path(i)) {
            Ok(t) => {
                reply.data(&t);
            }
            Err(no) => reply.error(no),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let start = Instant::now();
        let p = self.real(parent);
        let _s = tracing::debug_span!("mknod", parent = p).entered();
        let r = match FileKind::from_mode(mode) {
            Some(kind) => self.vfs.mknod(
                ctx(req),
                p,
                name.as_bytes(),
                kind,
                mode & !umask & 0o7777,
                rdev,
            ),
            None => Err(VfsError::Meta(MetaError::Invalid("file type"))),
        };
        self.reply_entry(
            "mknod",
            start,
            r,
            || self.vfs.path_of(p, name.as_bytes()),
            reply,
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let start = Instant::now();
        let p = self.real(parent);
        let _s = tracing::debug_span!("mkdir", parent = p).entered();
        let r = self.vfs.mknod(
            ctx(req),
            p,
            name.as_bytes(),
            FileKind::Dir,
            mode & !umask & 0o7777,
            0,
        );
        self.reply_entry(
            "mkdir",
            start,
            r,
            || self.vfs.path_of(p, name.as_bytes()),
            reply,
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let start = Instant::now();
        let p = self.real(parent);
        let _s = tracing::debug_span!("unlink", parent = p).entered();
        let r = self.vfs.unlink(p, name.as_bytes());
        self.reply_empty(
            "unlink",
            start,
            r,
            || self.vfs.path_of(p, name.as_bytes()),
            reply,
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let start = Instant::now();
        let p = self.real(parent);
        let _s = tracing::debug_span!("rmdir", parent = p).entered();
        let r = self.vfs.rmdir(p, name.as_bytes());
        self.reply_empty(
            "rmdir",
            start,
            r,
            || self.vfs.path_of(p, name.as_bytes()),
            reply,
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let start = Instant::now();
        let p = self.real(parent);
        let _s = tracing::debug_span!("symlink", parent = p).entered();
        let r = self.vfs.symlink(
            ctx(req),
            p,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
        );
        self.reply_entry(
            "symlink",
            start,
            r,
            || self.vfs.path_of(p, link_name.as_bytes()),
            reply,
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let start = Instant::now();
        let (p, np) = (self.real(parent), self.real(newparent));
        let _s = tracing::debug_span!("rename", parent = p, newparent = np).entered();
        let r = self
            .vfs
            .rename(p, name.as_bytes(), np, newname.as_bytes(), flags.bits());
        self.reply_empty(
            "rename",
            start,
            r,
            || {
                format!(
                    "{} -> {}",
                    self.vfs.path_of(p, name.as_bytes()),
                    self.vfs.path_of(np, newname.as_bytes())
                )
            },
            reply,
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let start = Instant::now();
        let (i, np) = (self.real(ino), self.real(newparent));
        let _s = tracing::debug_span!("link", ino = i, newparent = np).entered();
        let r = self.vfs.link(i, np, newname.as_bytes());
        self.reply_entry(
            "link",
            start,
            r,
            || self.vfs.path_of(np, newname.as_bytes()),
            reply,
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let start = Instant::now();
        let i = self.real(ino);
        let _s = tracing::debug_span!("open", ino = i).entered();
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        match self.outcome("open", start, self.vfs.open(i, write), || self.vfs.path(i)) {
            Ok((fh, keep)) => {
                let f = if keep {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                reply.opened(FileHandle(fh), f);
            }
            Err(no) => reply.error(no),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let start = Instant::now();
        let i = self.real(ino);
        let _s = tracing::debug_span!("read", ino = i, offset, size).entered();
        self.vfs.adopt_file_handle(i, fh.0);
        match self.outcome("read", start, self.vfs.read(i, fh.0, offset, size), || {
            self.vfs.path(i)
        }) {
            Ok(data) => {
                self.vfs.metrics.fuse_bytes(false, data.len() as u64);
                reply.data(&data);
            }
            Err(no) => reply.error(no),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let start = Instant::now();
        let i = self.real(ino);
        let _s = tracing::debug_span!("write", ino = i, offset, size = data.len()).entered();
        self.vfs.adopt_file_handle(i, fh.0);
        match self.outcome("write", start, self.vfs.write(i, offset, data), || {
            self.vfs.path(i)
        }) {
            Ok(n) => {
                self.vfs.metrics.fuse_bytes(true, n as u64);
                reply.written(n as u32);
            }
            Err(no) => reply.error(no),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        let start = Instant::now();
        let i = self.real(ino);
        let _s = tracing::debug_span!("flush", ino = i).entered();
        self.vfs.adopt_file_handle(i, fh.0);
        let r = self.vfs.flush(i);
        // close(2) releases the POSIX locks the closing process holds on the file.
        if let Err(e) = self.vfs.unlock_owner(i, lock.0) {
            tracing::warn!(volume = %self.vfs.volume(), path = %self.vfs.path(i), error = %e, "releasing POSIX locks failed");
        }
        self.reply_empty("flush", start, r, || self.vfs.path(i), reply);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let start = Instant::now();
        let i = self.real(ino);
        let _s = tracing::debug_span!("release", ino = i).entered();
        self.vfs.adopt_file_handle(i, fh.0);
        // The last close of an open file drops its flock (FUSE_RELEASE_FLOCK_UNLOCK).
        let r = self.vfs.release(i, fh.0, lock.map(|o| o.0));
        self.reply_empty("release", start, r, || self.vfs.path(i), reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let start = Instant::now();
        let i = self.real(ino);
        let _s = tracing::debug_span!("fsync", ino = i).entered();
        let r = self.vfs.fsync(i);
        self.reply_empty("fsync", start, r, || self.vfs.path(i), reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let start = Instant::now();
        let i = self.real(ino);
        let _s = tracing::debug_span!("opendir", ino = i).entered();
        match self.outcome("opendir", start, self.vfs.opendir(i), || self.vfs.path(i)) {
            Ok(fh) => {
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(no) => reply.error(no),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let start = Instant::now();
        let i = self.real(ino);
        let _s = tracing::debug_span!("readdir", ino = i, offset).entered();
        match self.vfs.readdir(i, fh.0, offset) {
            Ok(entries) => {
                for (off, e) in entries {
                    // `..` of the mount root is the root itself (never a way out of --subdir).
                    let kino = if i == self.root && e.name == b".." {
                        INodeNo(ROOT_INO)
                    } else {
                        self.kernel(e.ino)
                    };
                    if reply.add(kino, off, file_type(e.kind), OsStr::from_bytes(&e.name)) {
                        break;
                    }
                }
                self.finish("readdir", start, None, || self.vfs.path(i));
                reply.ok();
            }
            Err(e) => {
                let no = self.finish("readdir", start, Some(&e), || self.vfs.path(i));
                reply.error(no.unwrap_or(Errno::EIO));
            }
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.vfs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Metadata changes are committed when each operation returns.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let start = Instant::now();
        match self.outcome(
            "statfs",
            start,
            self.vfs.statfs(self.real(ino)),
            String::new,
        ) {
            Ok(s) => {
                let bsize = 4096u64;
                reply.statfs(
                    s.total_space / bsize,
                    s.avail_space / bsize,
                    s.avail_space / bsize,
                    s.used_inodes + s.avail_inodes,
                    s.avail_inodes,
                    bsize as u32,
                    255,
                    bsize as u32,
                );
            }
            Err(no) => reply.error(no),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let start = Instant::now();
        let i = self.real(ino);
        let r = self.vfs.setxattr(i, name.as_bytes(), value, flags);
        self.reply_empty("setxattr", start, r, || self.vfs.path(i), reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let start = Instant::now();
        let i = self.real(ino);
        match self.outcome(
            "getxattr",
            start,
            self.vfs.getxattr(i, name.as_bytes()),
            || self.vfs.path(i),
        ) {
            Ok(v) => {
                if size == 0 {
                    reply.size(v.len() as u32);
                } else if v.len() > size as usize {
                    reply.error(Errno::from_i32(libc::ERANGE));
                } else {
                    reply.data(&v);
                }
            }
            Err(no) => reply.error(no),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let start = Instant::now();
        let i = self.real(ino);
        match self.outcome("listxattr", start, self.vfs.listxattr(i), || {
            self.vfs.path(i)
        }) {
            Ok(names) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(&n);
                    buf.push(0);
                }
                if size == 0 {
                    reply.size(buf.len() as u32);
                } else if buf.len() > size as usize {
                    reply.error(Errno::from_i32(libc::ERANGE));
                } else {
                    reply.data(&buf);
                }
            }
            Err(no) => reply.error(no),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let start = Instant::now();
        let i = self.real(ino);
        let r = self.vfs.removexattr(i, name.as_bytes());
        self.reply_empty("removexattr", start, r, || self.vfs.path(i), reply);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission bits are checked by the kernel (default_permissions); only existence here.
        let start = Instant::now();
        let i = self.real(ino);
        let r = self.vfs.getattr(i).map(|_| ());
        self.reply_empty("access", start, r, || self.vfs.path(i), reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let start = Instant::now();
        let p = self.real(parent);
        let _s = tracing::debug_span!("create", parent = p).entered();
        match self
            .vfs
            .create(ctx(req), p, name.as_bytes(), mode & !umask & 0o7777)
        {
            Ok((n, fh)) => {
                self.finish("create", start, None, || {
                    self.vfs.path_of(p, name.as_bytes())
                });
                reply.created(
                    &self.entry_ttl,
                    &self.attr(&n),
                    GENERATION,
                    FileHandle(fh),
                    FopenFlags::empty(),
                );
            }
            Err(e) => {
                let no = self.finish("create", start, Some(&e), || {
                    self.vfs.path_of(p, name.as_bytes())
                });
                reply.error(no.unwrap_or(Errno::EIO));
            }
        }
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        let start_t = Instant::now();
        let i = self.real(ino);
        match self.outcome(
            "getlk",
            start_t,
            self.vfs.getlk(i, owner.0, typ as u32, start, end),
            || self.vfs.path(i),
        ) {
            Ok(Some(l)) => {
                reply.locked(l.start, l.end, l.typ as i32, l.pid);
            }
            Ok(None) => {
                self.finish("getlk", start_t, None, || self.vfs.path(i));
                reply.locked(start, end, libc::F_UNLCK, 0);
            }
            Err(no) => reply.error(no),
        }
    }

    fn setlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let start_t = Instant::now();
        let i = self.real(ino);
        let _s = tracing::debug_span!("setlk", ino = i, start, end, typ, sleep).entered();
        self.vfs.adopt_file_handle(i, fh.0);
        match self
            .vfs
            .setlk(i, fh.0, owner.0, typ as u32, start, end, pid)
        {
            Ok(true) => {
                self.finish("setlk", start_t, None, || self.vfs.path(i));
                reply.ok();
            }
            Ok(false) if !sleep => {
                self.finish("setlk", start_t, None, || self.vfs.path(i));
                reply.error(Errno::from_i32(libc::EAGAIN));
            }
            Ok(false) => {
                // Wait on a thread of its own so that blocked lockers never occupy the FUSE
                // workers (the holder's unlock must get through).
                let vfs = self.vfs.clone();
                std::thread::spawn(move || {
                    let mut delay = Duration::from_millis(5);
                    loop {
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(Duration::from_millis(200));
                        match vfs.setlk(i, fh.0, owner.0, typ as u32, start, end, pid) {
                            Ok(true) => {
                                vfs.metrics.fuse_op("setlkw", start_t.elapsed(), None);
                                return reply.ok();
                            }
                            Ok(false) => continue,
                            Err(e) => {
                                let no = errno_of(&e);
                                vfs.metrics.fuse_op("setlkw", start_t.elapsed(), Some(no));
                                return reply.error(Errno::from_i32(no));
                            }
                        }
                    }
                });
            }
            Err(e) => {
                let no = self.finish("setlk", start_t, Some(&e), || self.vfs.path(i));
                reply.error(no.unwrap_or(Errno::EIO));
            }
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let start = Instant::now();
        let i = self.real(ino);
        let _s = tracing::debug_span!("fallocate", ino = i, offset, length, mode).entered();
        let r = self.vfs.fallocate(i, mode, offset, length).map(|_| ());
        self.reply_empty("fallocate", start, r, || self.vfs.path(i), reply);
    }
}

/// Mount `vfs` at `mountpoint` and serve requests until unmounted.
pub fn mount(
    vfs: Arc<Vfs>,
    root: Ino,
    mountpoint: &Path,
    settings: &MountSettings,
) -> io::Result<()> {
    let fs = StrataFs::new(vfs, root);
    let mut options = vec![
        MountOption::FSName(settings.fsname.clone()),
        MountOption::Subtype("strata".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    if settings.read_only {
        options.push(MountOption::RO);
    }
    let mut config = Config::default();
    config.mount_options = options;
    config.acl = if settings.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(settings.threads.max(1));
    config.clone_fd = true;
    let session = fuser::Session::new(fs, mountpoint, &config)?;
    session.run()
}

/// Serve a FUSE connection handed over by a keeper ([`crate::fusefd`]) instead of mounting:
/// a fresh connection directly (the kernel sends INIT), a resumed one through the relay.
/// Worker threads share the connection's descriptor (no `clone_fd`), so that requests a dead
/// client had read are re-queued by `FUSE_NOTIFY_RESEND` rather than aborted. `on_serving`
/// runs once requests are being answered. Returns when the kernel ends the connection
/// (unmount) or fuser's end of the relay closes.
pub fn serve_fd(
    vfs: Arc<Vfs>,
    root: Ino,
    handover: crate::fusefd::Handover,
    settings: &MountSettings,
    on_serving: impl FnOnce(Arc<std::os::fd::OwnedFd>, std::os::unix::net::UnixStream),
) -> io::Result<()> {
    let fs = StrataFs::new(vfs, root);
    let mut config = Config::default();
    config.acl = if settings.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(settings.threads.max(1));
    config.clone_fd = false;
    let crate::fusefd::Handover {
        dev,
        resume,
        relay,
        conn,
    } = handover;
    let dev = Arc::new(dev);
    if !resume {
        let own = dev.try_clone()?;
        let session = fuser::Session::from_fd(fs, own, config.acl, config)?;
        on_serving(dev, conn);
        return session.run();
    }
    let (fuser_end, relay_end) = match relay {
        Some(p) => p,
        None => crate::fusefd::relay_pair()?,
    };
    let relay = crate::fusefd::start_relay(dev.clone(), relay_end)?;
    let session = fuser::Session::from_fd(fs, fuser_end, config.acl, config)?;
    on_serving(dev, conn);
    let res = session.run();
    let _ = relay.join();
    match res {
        // The relay closes fuser's end when the kernel connection ends: fuser then sees an
        // empty read, which it reports as an invalid request.
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Ok(()),
        other => other,
    }
}
