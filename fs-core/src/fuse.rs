//! The FUSE adapter: translates `fuser` requests into [`Vfs`] calls. This is the one place
//! where errors become errno values ([`errno_of`]). Every operation runs in a tracing span,
//! is counted and timed in the metrics, and failures or slow operations are logged with the
//! path and the volume.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use fuser::{
    AccessFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};

use crate::accesslog::{self, AccessLog, Record};
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
            | MetaError::Engine(_)
            | MetaError::JournalTrimmed(_) => libc::EIO,
        },
        // Open of an inode deleted since the kernel looked it up: the kernel looks the path
        // up again and retries once (a path a rename replaces opens as the old or new file).
        VfsError::Stale => libc::ESTALE,
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
        libc::ENOENT
            | libc::EEXIST
            | libc::ENODATA
            | libc::ENOTEMPTY
            | libc::ERANGE
            | libc::EROFS
            | libc::ESTALE
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
    /// The readers of `.accesslog`.
    log: Arc<AccessLog>,
    /// Owner of `.accesslog` (the user the mount runs as) and when the mount started.
    owner: (u32, u32),
    started: SystemTime,
    /// Files last seen (in attributes this mount returned) with a set-user-ID bit, or a
    /// set-group-ID bit with group execute: a write through a direct-I/O handle asks the
    /// file system to clear them (`FUSE_WRITE_KILL_SUIDGID`), and only these need a look.
    privileged: Mutex<HashSet<Ino>>,
}

/// One request being served: when it started, who sent it, and what the access log shows of
/// its arguments (formatted only while somebody reads the log).
struct Call {
    start: Instant,
    uid: u32,
    gid: u32,
    pid: u32,
    /// Whether the access log had readers when the request came.
    log: bool,
    /// ` key=value` pairs for the access log.
    args: String,
    /// Bytes read or written.
    bytes: u64,
}

impl Call {
    fn args(mut self, f: impl FnOnce() -> String) -> Call {
        if self.log {
            self.args = f();
        }
        self
    }
}

/// The path(s) an operation names, computed only for logs: a closure giving one path, or
/// [`Two`] for a rename or link (source, target).
trait Paths {
    fn paths(&self) -> (String, Option<String>);
}

impl<F: Fn() -> String> Paths for F {
    fn paths(&self) -> (String, Option<String>) {
        (self(), None)
    }
}

struct Two<A, B>(A, B);

impl<A: Fn() -> String, B: Fn() -> String> Paths for Two<A, B> {
    fn paths(&self) -> (String, Option<String>) {
        (self.0(), Some(self.1()))
    }
}

/// Add a finished request to the access log.
fn log_call(
    log: &AccessLog,
    op: &str,
    c: &Call,
    elapsed: Duration,
    errno: Option<i32>,
    paths: (String, Option<String>),
) {
    let mut args = String::new();
    if let Some(to) = &paths.1 {
        args.push_str(" to=");
        accesslog::escape_into(&mut args, to);
    }
    args.push_str(&c.args);
    log.record(&Record {
        at: SystemTime::now() - elapsed,
        uid: c.uid,
        gid: c.gid,
        pid: c.pid,
        op,
        path: &paths.0,
        args: &args,
        errno,
        bytes: c.bytes,
        secs: elapsed.as_secs_f64(),
    });
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
        // SAFETY: geteuid and getegid only read the process' credentials.
        let owner = unsafe { (libc::geteuid(), libc::getegid()) };
        StrataFs {
            vfs,
            root,
            attr_ttl,
            entry_ttl,
            dir_entry_ttl,
            log: Arc::new(AccessLog::default()),
            owner,
            started: SystemTime::now(),
            privileged: Mutex::new(HashSet::new()),
        }
    }

    /// Clear the set-user-ID bit, and the set-group-ID bit if the group may execute, of `ino`
    /// before an unprivileged write.
    fn kill_privileges(&self, ino: Ino) -> crate::vfs::Result<()> {
        let n = self.vfs.getattr(ino)?;
        if kills_privileges(n.mode) {
            let mut mode = n.mode & 0o7777 & !0o4000;
            if mode & 0o010 != 0 {
                mode &= !0o2000;
            }
            let set = SetAttr {
                mode: Some(mode),
                ..SetAttr::default()
            };
            self.vfs.setattr(ino, &set, None)?;
        }
        self.privileged.lock().remove(&ino);
        Ok(())
    }

    fn call(&self, req: &Request) -> Call {
        Call {
            start: Instant::now(),
            uid: req.uid(),
            gid: req.gid(),
            pid: req.pid(),
            log: self.log.active(),
            args: String::new(),
            bytes: 0,
        }
    }

    /// `name` in `parent` is the access log's: no operation creates, removes or renames it.
    fn log_name(parent: INodeNo, name: &OsStr) -> bool {
        parent.0 == ROOT_INO && name.as_bytes() == accesslog::NAME
    }

    /// Attributes of `.accesslog`: a read-only file of its own, empty (reads bypass the page
    /// cache), readable by the user the mount runs as.
    fn log_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(accesslog::INO),
            size: 0,
            blocks: 0,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::RegularFile,
            perm: 0o400,
            nlink: 1,
            uid: self.owner.0,
            gid: self.owner.1,
            rdev: 0,
            blksize: 4096,
            flags: 0,
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
        if n.kind == FileKind::File {
            let mut p = self.privileged.lock();
            if kills_privileges(n.mode) {
                p.insert(n.ino);
            } else if !p.is_empty() {
                p.remove(&n.ino);
            }
        }
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

    /// Record an operation (metrics, the access log); log it with its path when it failed
    /// unexpectedly or was slow.
    fn finish(
        &self,
        op: &'static str,
        c: &Call,
        err: Option<&VfsError>,
        path: impl Paths,
    ) -> Option<Errno> {
        let elapsed = c.start.elapsed();
        let errno = err.map(errno_of);
        self.vfs.metrics.fuse_op(op, elapsed, errno);
        if c.log {
            log_call(&self.log, op, c, elapsed, errno, path.paths());
        }
        let path = || match path.paths() {
            (p, Some(to)) => format!("{p} -> {to}"),
            (p, None) => p,
        };
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
        c: &Call,
        r: Result<T, VfsError>,
        path: impl Paths,
    ) -> Result<T, Errno> {
        match r {
            Ok(v) => {
                self.finish(op, c, None, path);
                Ok(v)
            }
            Err(e) => Err(self.finish(op, c, Some(&e), path).unwrap_or(Errno::EIO)),
        }
    }

    fn reply_entry(
        &self,
        op: &'static str,
        c: &Call,
        r: Result<Node, VfsError>,
        path: impl Paths,
        reply: ReplyEntry,
    ) {
        match self.outcome(op, c, r, path) {
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
        c: &Call,
        r: Result<(), VfsError>,
        path: impl Paths,
        reply: ReplyEmpty,
    ) {
        match self.outcome(op, c, r, path) {
            Ok(()) => reply.ok(),
            Err(no) => reply.error(no),
        }
    }

    fn reply_attr(
        &self,
        op: &'static str,
        c: &Call,
        r: Result<Node, VfsError>,
        path: impl Paths,
        reply: ReplyAttr,
    ) {
        match self.outcome(op, c, r, path) {
            Ok(n) => reply.attr(&self.attr_ttl, &self.attr(&n)),
            Err(no) => reply.error(no),
        }
    }
}

/// Whether a write by an unprivileged process clears bits of `mode` (as the kernel's
/// `should_remove_suid`: set-user-ID, and set-group-ID when the group may execute).
fn kills_privileges(mode: u32) -> bool {
    mode & 0o4000 != 0 || mode & 0o2010 == 0o2010
}

/// Open flags for a file opened write-only: direct I/O. Such a handle can neither read nor
/// be mapped, so the page cache gains nothing from its writes, and going around it saves a
/// copy of every byte and the kernel's `getxattr("security.capability")` before every write
/// (a second request per write). Cached pages of the written range held for other handles
/// are dropped by the kernel. Read-write opens keep the page cache.
fn write_only_flags(flags: i32) -> FopenFlags {
    if flags & libc::O_ACCMODE == libc::O_WRONLY {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        FopenFlags::empty()
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
        // Write-only opens bypass the page cache (`write_only_flags`); with this flag the
        // kernel also drops cached pages of the range such a write covers, for every kernel
        // version that knows FOPEN_DIRECT_IO.
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if Self::log_name(parent, name) {
            return reply.entry_with_ttls(
                &self.attr_ttl,
                &self.attr_ttl,
                &self.log_attr(),
                GENERATION,
            );
        }
        let c = self.call(req);
        let p = self.real(parent);
        let _s = tracing::debug_span!("lookup", parent = p).entered();
        let r = self.vfs.lookup(p, name.as_bytes());
        self.reply_entry(
            "lookup",
            &c,
            r,
            || self.vfs.path_of(p, name.as_bytes()),
            reply,
        );
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == accesslog::INO {
            return reply.attr(&self.attr_ttl, &self.log_attr());
        }
        let c = self.call(req);
        let i = self.real(ino);
        let _s = tracing::debug_span!("getattr", ino = i).entered();
        let r = self.vfs.getattr(i);
        self.reply_attr("getattr", &c, r, || self.vfs.path(i), reply);
    }

    fn setattr(
        &self,
        req: &Request,
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
        if ino.0 == accesslog::INO {
            return reply.error(Errno::from_i32(libc::EPERM));
        }
        let c = self.call(req).args(|| {
            let mut a = String::new();
            if let Some(m) = mode {
                a += &format!(" mode={m:o}");
            }
            if let Some(u) = uid {
                a += &format!(" uid={u}");
            }
            if let Some(g) = gid {
                a += &format!(" gid={g}");
            }
            if let Some(s) = size {
                a += &format!(" size={s}");
            }
            if atime.is_some() {
                a += " atime";
            }
            if mtime.is_some() {
                a += " mtime";
            }
            a
        });
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
        self.reply_attr("setattr", &c, r, || self.vfs.path(i), reply);
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let c = self.call(req);
        let i = self.real(ino);
        match self.outcome("readlink", &c, self.vfs.readlink(i), || self.vfs.path(i)) {
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
        if Self::log_name(parent, name) {
            return reply.error(Errno::from_i32(libc::EEXIST));
        }
        let c = self
            .call(req)
            .args(|| format!(" mode={:o} rdev={rdev}", mode & !umask));
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
            &c,
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
        if Self::log_name(parent, name) {
            return reply.error(Errno::from_i32(libc::EEXIST));
        }
        let c = self
            .call(req)
            .args(|| format!(" mode={:o}", mode & !umask & 0o7777));
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
            &c,
            r,
            || self.vfs.path_of(p, name.as_bytes()),
            reply,
        );
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if Self::log_name(parent, name) {
            return reply.error(Errno::from_i32(libc::EPERM));
        }
        let c = self.call(req);
        let p = self.real(parent);
        let _s = tracing::debug_span!("unlink", parent = p).entered();
        let r = self.vfs.unlink(p, name.as_bytes());
        self.reply_empty(
            "unlink",
            &c,
            r,
            || self.vfs.path_of(p, name.as_bytes()),
            reply,
        );
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if Self::log_name(parent, name) {
            return reply.error(Errno::from_i32(libc::EPERM));
        }
        let c = self.call(req);
        let p = self.real(parent);
        let _s = tracing::debug_span!("rmdir", parent = p).entered();
        let r = self.vfs.rmdir(p, name.as_bytes());
        self.reply_empty(
            "rmdir",
            &c,
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
        if Self::log_name(parent, link_name) {
            return reply.error(Errno::from_i32(libc::EEXIST));
        }
        let c = self.call(req).args(|| {
            format!(
                " target={}",
                accesslog::escape(&target.as_os_str().to_string_lossy())
            )
        });
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
            &c,
            r,
            || self.vfs.path_of(p, link_name.as_bytes()),
            reply,
        );
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if Self::log_name(parent, name) || Self::log_name(newparent, newname) {
            return reply.error(Errno::from_i32(libc::EPERM));
        }
        let c = self.call(req).args(|| format!(" flags={}", flags.bits()));
        let (p, np) = (self.real(parent), self.real(newparent));
        let _s = tracing::debug_span!("rename", parent = p, newparent = np).entered();
        let r = self
            .vfs
            .rename(p, name.as_bytes(), np, newname.as_bytes(), flags.bits());
        self.reply_empty(
            "rename",
            &c,
            r,
            Two(
                || self.vfs.path_of(p, name.as_bytes()),
                || self.vfs.path_of(np, newname.as_bytes()),
            ),
            reply,
        );
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        if ino.0 == accesslog::INO || Self::log_name(newparent, newname) {
            return reply.error(Errno::from_i32(libc::EPERM));
        }
        let c = self.call(req);
        let (i, np) = (self.real(ino), self.real(newparent));
        let _s = tracing::debug_span!("link", ino = i, newparent = np).entered();
        let r = self.vfs.link(i, np, newname.as_bytes());
        self.reply_entry(
            "link",
            &c,
            r,
            Two(
                || self.vfs.path(i),
                || self.vfs.path_of(np, newname.as_bytes()),
            ),
            reply,
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        if ino.0 == accesslog::INO {
            if write {
                return reply.error(Errno::from_i32(libc::EACCES));
            }
            return match self.log.open() {
                // Reads bypass the page cache: the file's size says nothing of its stream.
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
                Err(e) => {
                    tracing::warn!(volume = %self.vfs.volume(), error = %e, "opening the access log failed");
                    reply.error(Errno::from_i32(libc::EIO))
                }
            };
        }
        let c = self.call(req).args(|| format!(" flags={:#x}", flags.0));
        let i = self.real(ino);
        let _s = tracing::debug_span!("open", ino = i).entered();
        match self.outcome("open", &c, self.vfs.open(i, write), || self.vfs.path(i)) {
            Ok((fh, keep)) => {
                let f = if keep {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                reply.opened(FileHandle(fh), f | write_only_flags(flags.0));
            }
            Err(no) => reply.error(no),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino.0 == accesslog::INO {
            // Answered when lines arrive, on the log reader's own thread.
            if let Err(e) = self
                .log
                .read(fh.0, size as usize, move |data| reply.data(&data))
            {
                tracing::warn!(volume = %self.vfs.volume(), error = %e, "reading the access log failed");
            }
            return;
        }
        let mut c = self.call(req).args(|| format!(" off={offset} size={size}"));
        let i = self.real(ino);
        let _s = tracing::debug_span!("read", ino = i, offset, size).entered();
        self.vfs.adopt_file_handle(i, fh.0);
        let r = self.vfs.read(i, fh.0, offset, size);
        c.bytes = r.as_ref().map_or(0, |d| d.len() as u64);
        match self.outcome("read", &c, r, || self.vfs.path(i)) {
            Ok(data) => {
                self.vfs.metrics.fuse_bytes(false, data.len() as u64);
                reply.data(&data);
            }
            Err(no) => reply.error(no),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino.0 == accesslog::INO {
            return reply.error(Errno::from_i32(libc::EBADF));
        }
        let mut c = self
            .call(req)
            .args(|| format!(" off={offset} size={}", data.len()));
        let i = self.real(ino);
        let _s = tracing::debug_span!("write", ino = i, offset, size = data.len()).entered();
        self.vfs.adopt_file_handle(i, fh.0);
        let r = if wf.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            && self.privileged.lock().contains(&i)
        {
            // A direct-I/O write: the kernel left clearing the bits to us (buffered writes
            // get a setattr from the kernel first).
            self.kill_privileges(i)
                .and_then(|()| self.vfs.write(i, offset, data))
        } else {
            self.vfs.write(i, offset, data)
        };
        c.bytes = r.as_ref().map_or(0, |n| *n as u64);
        match self.outcome("write", &c, r, || self.vfs.path(i)) {
            Ok(n) => {
                self.vfs.metrics.fuse_bytes(true, n as u64);
                reply.written(n as u32);
            }
            Err(no) => reply.error(no),
        }
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        if ino.0 == accesslog::INO {
            return reply.ok();
        }
        let c = self.call(req);
        let i = self.real(ino);
        let _s = tracing::debug_span!("flush", ino = i).entered();
        self.vfs.adopt_file_handle(i, fh.0);
        let r = self.vfs.flush(i);
        // close(2) releases the POSIX locks the closing process holds on the file.
        if let Err(e) = self.vfs.unlock_owner(i, lock.0) {
            tracing::warn!(volume = %self.vfs.volume(), path = %self.vfs.path(i), error = %e, "releasing POSIX locks failed");
        }
        self.reply_empty("flush", &c, r, || self.vfs.path(i), reply);
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if ino.0 == accesslog::INO {
            self.log.close(fh.0);
            return reply.ok();
        }
        let c = self.call(req);
        let i = self.real(ino);
        let _s = tracing::debug_span!("release", ino = i).entered();
        self.vfs.adopt_file_handle(i, fh.0);
        // The last close of an open file drops its flock (FUSE_RELEASE_FLOCK_UNLOCK).
        let r = self.vfs.release(i, fh.0, lock.map(|o| o.0));
        self.reply_empty("release", &c, r, || self.vfs.path(i), reply);
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino.0 == accesslog::INO {
            return reply.ok();
        }
        let c = self.call(req).args(|| format!(" datasync={datasync}"));
        let i = self.real(ino);
        let _s = tracing::debug_span!("fsync", ino = i).entered();
        let r = self.vfs.fsync(i);
        self.reply_empty("fsync", &c, r, || self.vfs.path(i), reply);
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let c = self.call(req);
        let i = self.real(ino);
        let _s = tracing::debug_span!("opendir", ino = i).entered();
        match self.outcome("opendir", &c, self.vfs.opendir(i), || self.vfs.path(i)) {
            Ok(fh) => {
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(no) => reply.error(no),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let c = self.call(req).args(|| format!(" off={offset}"));
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
                self.finish("readdir", &c, None, || self.vfs.path(i));
                reply.ok();
            }
            Err(e) => {
                let no = self.finish("readdir", &c, Some(&e), || self.vfs.path(i));
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

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let c = self.call(req);
        match self.outcome(
            "statfs",
            &c,
            self.vfs.statfs(if ino.0 == accesslog::INO {
                self.root
            } else {
                self.real(ino)
            }),
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
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if ino.0 == accesslog::INO {
            return reply.error(Errno::from_i32(libc::EPERM));
        }
        let c = self.call(req).args(|| {
            format!(
                " name={} size={} flags={flags}",
                accesslog::escape(&name.to_string_lossy()),
                value.len()
            )
        });
        let i = self.real(ino);
        let r = self.vfs.setxattr(i, name.as_bytes(), value, flags);
        self.reply_empty("setxattr", &c, r, || self.vfs.path(i), reply);
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if ino.0 == accesslog::INO {
            return reply.error(Errno::from_i32(libc::ENODATA));
        }
        let c = self.call(req).args(|| {
            format!(
                " name={} size={size}",
                accesslog::escape(&name.to_string_lossy())
            )
        });
        let i = self.real(ino);
        match self.outcome(
            "getxattr",
            &c,
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

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if ino.0 == accesslog::INO {
            return reply.size(0);
        }
        let c = self.call(req).args(|| format!(" size={size}"));
        let i = self.real(ino);
        match self.outcome("listxattr", &c, self.vfs.listxattr(i), || self.vfs.path(i)) {
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

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if ino.0 == accesslog::INO {
            return reply.error(Errno::from_i32(libc::EPERM));
        }
        let c = self
            .call(req)
            .args(|| format!(" name={}", accesslog::escape(&name.to_string_lossy())));
        let i = self.real(ino);
        let r = self.vfs.removexattr(i, name.as_bytes());
        self.reply_empty("removexattr", &c, r, || self.vfs.path(i), reply);
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // Permission bits are checked by the kernel (default_permissions); only existence here.
        if ino.0 == accesslog::INO {
            return reply.ok();
        }
        let c = self.call(req).args(|| format!(" mask={:#o}", mask.bits()));
        let i = self.real(ino);
        let r = self.vfs.getattr(i).map(|_| ());
        self.reply_empty("access", &c, r, || self.vfs.path(i), reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if Self::log_name(parent, name) {
            return reply.error(Errno::from_i32(libc::EEXIST));
        }
        let c = self
            .call(req)
            .args(|| format!(" mode={:o} flags={flags:#x}", mode & !umask & 0o7777));
        let p = self.real(parent);
        let _s = tracing::debug_span!("create", parent = p).entered();
        match self
            .vfs
            .create(ctx(req), p, name.as_bytes(), mode & !umask & 0o7777)
        {
            Ok((n, fh)) => {
                self.finish("create", &c, None, || self.vfs.path_of(p, name.as_bytes()));
                reply.created(
                    &self.entry_ttl,
                    &self.attr(&n),
                    GENERATION,
                    FileHandle(fh),
                    write_only_flags(flags),
                );
            }
            Err(e) => {
                let no = self.finish("create", &c, Some(&e), || {
                    self.vfs.path_of(p, name.as_bytes())
                });
                reply.error(no.unwrap_or(Errno::EIO));
            }
        }
    }

    fn getlk(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        if ino.0 == accesslog::INO {
            return reply.error(Errno::from_i32(libc::EINVAL));
        }
        let c = self
            .call(req)
            .args(|| format!(" start={start} end={end} type={typ}"));
        let i = self.real(ino);
        match self.outcome(
            "getlk",
            &c,
            self.vfs.getlk(i, owner.0, typ as u32, start, end),
            || self.vfs.path(i),
        ) {
            Ok(Some(l)) => {
                reply.locked(l.start, l.end, l.typ as i32, l.pid);
            }
            Ok(None) => {
                reply.locked(start, end, libc::F_UNLCK, 0);
            }
            Err(no) => reply.error(no),
        }
    }

    fn setlk(
        &self,
        req: &Request,
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
        if ino.0 == accesslog::INO {
            return reply.error(Errno::from_i32(libc::EINVAL));
        }
        let c = self
            .call(req)
            .args(|| format!(" start={start} end={end} type={typ} sleep={sleep}"));
        let i = self.real(ino);
        let _s = tracing::debug_span!("setlk", ino = i, start, end, typ, sleep).entered();
        self.vfs.adopt_file_handle(i, fh.0);
        match self
            .vfs
            .setlk(i, fh.0, owner.0, typ as u32, start, end, pid)
        {
            Ok(true) => {
                self.finish("setlk", &c, None, || self.vfs.path(i));
                reply.ok();
            }
            Ok(false) if !sleep => {
                self.finish("setlk", &c, None, || self.vfs.path(i));
                reply.error(Errno::from_i32(libc::EAGAIN));
            }
            Ok(false) => {
                // Wait on a thread of its own so that blocked lockers never occupy the FUSE
                // workers (the holder's unlock must get through).
                let vfs = self.vfs.clone();
                let log = self.log.clone();
                std::thread::spawn(move || {
                    let done = |errno: Option<i32>| {
                        let elapsed = c.start.elapsed();
                        vfs.metrics.fuse_op("setlkw", elapsed, errno);
                        if c.log {
                            log_call(&log, "setlkw", &c, elapsed, errno, (vfs.path(i), None));
                        }
                    };
                    let mut delay = Duration::from_millis(5);
                    loop {
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(Duration::from_millis(200));
                        match vfs.setlk(i, fh.0, owner.0, typ as u32, start, end, pid) {
                            Ok(true) => {
                                done(None);
                                return reply.ok();
                            }
                            Ok(false) => continue,
                            Err(e) => {
                                let no = errno_of(&e);
                                done(Some(no));
                                return reply.error(Errno::from_i32(no));
                            }
                        }
                    }
                });
            }
            Err(e) => {
                let no = self.finish("setlk", &c, Some(&e), || self.vfs.path(i));
                reply.error(no.unwrap_or(Errno::EIO));
            }
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino.0 == accesslog::INO {
            return reply.error(Errno::from_i32(libc::EPERM));
        }
        let c = self
            .call(req)
            .args(|| format!(" off={offset} len={length} mode={mode}"));
        let i = self.real(ino);
        let _s = tracing::debug_span!("fallocate", ino = i, offset, length, mode).entered();
        let r = self.vfs.fallocate(i, mode, offset, length).map(|_| ());
        self.reply_empty("fallocate", &c, r, || self.vfs.path(i), reply);
    }
}

/// `f_type` of a FUSE file system in `statfs(2)`.
const FUSE_SUPER_MAGIC: u64 = 0x6573_5546;

/// Make the kernel read ahead `bytes` of a sequential reader of the FUSE mount at
/// `mountpoint`: its backing device's `read_ahead_kb`. The kernel starts every FUSE mount at
/// 128 KiB and only ever lowers that at INIT, so the window a file system asks for there is
/// not reached without this. Waits until the mount answers (a `statfs` waits for INIT), and
/// refuses anything that is not a FUSE mount. Needs root (sysfs).
pub fn set_kernel_readahead(mountpoint: &Path, bytes: u64) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid C string and `st` a plain struct the call fills in.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.f_type as u64 != FUSE_SUPER_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a FUSE mount", mountpoint.display()),
        ));
    }
    let path = read_ahead_kb_file(mountpoint)?;
    std::fs::write(&path, format!("{}\n", bytes / 1024))
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// The sysfs file holding the kernel readahead (KiB) of the file system at `path`: its
/// backing device's `read_ahead_kb`.
pub fn read_ahead_kb_file(path: &Path) -> io::Result<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path)?.dev();
    Ok(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    )
    .into())
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

#[cfg(test)]
mod readahead_tests {
    #[test]
    fn kernel_readahead_is_only_set_on_fuse_mounts() {
        let d = tempfile::tempdir().unwrap();
        let e = super::set_kernel_readahead(d.path(), 4 << 20).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("not a FUSE mount"), "{e}");
    }
}
