//! A local directory (or a directory inside a mounted volume) as a sync endpoint: every
//! attribute a POSIX file system has. Files are written as `.strata-sync.NAME` next to
//! their final name and renamed into place once their bytes, owner, mode, extended
//! attributes and times are set, so a killed run never leaves a partial file under a real name.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::endpoint::{
    Caps, Counters, Endpoint, Item, Kind, Reader, Writer, copied_xattr, split, temp_name,
};
use super::{Result, SyncError};

/// Bytes read from a local file at a time.
const PIECE: usize = 1 << 20;

pub struct LocalDir {
    root: PathBuf,
    counters: Counters,
}

fn io_err(path: &Path, e: std::io::Error) -> SyncError {
    SyncError::Io(format!("{}: {e}", path.display()))
}

fn cstr(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| SyncError::Invalid(format!("{}: contains a NUL byte", path.display())))
}

fn item_of(name: String, md: &fs::Metadata) -> Item {
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_symlink() {
        Kind::Symlink
    } else {
        Kind::Other
    };
    Item {
        name,
        kind,
        size: if kind == Kind::Dir { 0 } else { md.len() },
        mtime: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        atime: md.atime() * 1_000_000_000 + md.atime_nsec(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        nlink: md.nlink() as u32,
        id: md.ino(),
    }
}

fn timespec(ns: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: ns.div_euclid(1_000_000_000) as libc::time_t,
        tv_nsec: ns.rem_euclid(1_000_000_000) as libc::c_long,
    }
}

/// Owner, mode (not for symlinks) and times of `path`, not following a symlink.
fn set_attrs_at(path: &Path, item: &Item, kind: Kind) -> Result<()> {
    let c = cstr(path)?;
    // SAFETY: a valid NUL-terminated path; plain system calls.
    unsafe {
        if libc::lchown(c.as_ptr(), item.uid, item.gid) != 0 {
            let e = std::io::Error::last_os_error();
            // Without root a file cannot be given away: it keeps the caller's owner (as
            // rsync and cp -p do).
            if !(e.raw_os_error() == Some(libc::EPERM) && libc::geteuid() != 0) {
                return Err(io_err(path, e));
            }
        }
        if kind != Kind::Symlink && libc::chmod(c.as_ptr(), item.mode & 0o7777) != 0 {
            return Err(io_err(path, std::io::Error::last_os_error()));
        }
        let times = [timespec(item.atime), timespec(item.mtime)];
        if libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        ) != 0
        {
            return Err(io_err(path, std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn list_xattrs(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = cstr(path)?;
    let mut names = vec![0u8; 4096];
    let n = loop {
        // SAFETY: valid path and a buffer of the given length.
        let r = unsafe {
            libc::llistxattr(
                c.as_ptr(),
                names.as_mut_ptr() as *mut libc::c_char,
                names.len(),
            )
        };
        if r >= 0 {
            break r as usize;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => names.resize(names.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(io_err(path, e)),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        if !copied_xattr(name) {
            continue;
        }
        let cn = CString::new(name).unwrap_or_default();
        let mut val = vec![0u8; 65536];
        // SAFETY: valid strings and buffer.
        let r = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cn.as_ptr(),
                val.as_mut_ptr() as *mut libc::c_void,
                val.len(),
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENODATA) {
                continue;
            }
            return Err(io_err(path, e));
        }
        val.truncate(r as usize);
        out.push((name.to_vec(), val));
    }
    out.sort();
    Ok(out)
}

fn set_xattrs_at(path: &Path, want: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
    let have = list_xattrs(path)?;
    let c = cstr(path)?;
    for (name, _) in &have {
        if !want.iter().any(|(n, _)| n == name) {
            let cn = CString::new(name.clone()).unwrap_or_default();
            // SAFETY: valid strings.
            if unsafe { libc::lremovexattr(c.as_ptr(), cn.as_ptr()) } != 0 {
                return Err(io_err(path, std::io::Error::last_os_error()));
            }
        }
    }
    for (name, value) in want {
        if have.iter().any(|(n, v)| n == name && v == value) {
            continue;
        }
        let cn = CString::new(name.clone())
            .map_err(|_| SyncError::Invalid("an xattr name with a NUL byte".into()))?;
        // SAFETY: valid strings and value buffer.
        let r = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                cn.as_ptr(),
                value.as_ptr() as *const libc::c_void,
                value.len(),
                0,
            )
        };
        if r != 0 {
            return Err(io_err(path, std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

impl LocalDir {
    pub fn new(root: impl Into<PathBuf>) -> LocalDir {
        LocalDir {
            root: root.into(),
            counters: Counters::default(),
        }
    }

    fn full(&self, path: &str) -> PathBuf {
        if path.is_empty() {
            self.root.clone()
        } else {
            self.root.join(path)
        }
    }

    fn remove_path(&self, p: &Path, kind: Kind) -> Result<()> {
        let r = if kind == Kind::Dir {
            fs::remove_dir_all(p)
        } else {
            fs::remove_file(p)
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(p, e)),
        }
    }

    /// Remove whatever is at `p` (not following symlinks).
    fn clear(&self, p: &Path) -> Result<()> {
        match fs::symlink_metadata(p) {
            Ok(md) if md.is_dir() => self.remove_path(p, Kind::Dir),
            Ok(_) => self.remove_path(p, Kind::File),
            Err(_) => Ok(()),
        }
    }
}

struct LocalReader {
    file: fs::File,
    path: PathBuf,
}

impl Reader for LocalReader {
    fn next(&mut self) -> Result<Option<Bytes>> {
        let mut buf = vec![0u8; PIECE];
        let mut n = 0;
        while n < buf.len() {
            match self.file.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(&self.path, e)),
            }
        }
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some(Bytes::from(buf)))
    }
}

struct LocalWriter {
    file: Option<fs::File>,
    tmp: PathBuf,
    path: PathBuf,
}

impl Writer for LocalWriter {
    fn write(&mut self, data: &[u8]) -> Result<()> {
        match &mut self.file {
            Some(f) => f.write_all(data).map_err(|e| io_err(&self.tmp, e)),
            None => Err(SyncError::Io(format!(
                "{}: already closed",
                self.tmp.display()
            ))),
        }
    }

    fn commit(mut self: Box<Self>, item: &Item, xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        drop(self.file.take());
        let res = (|| {
            set_xattrs_at(&self.tmp, xattrs)?;
            set_attrs_at(&self.tmp, item, Kind::File)?;
            if let Ok(md) = fs::symlink_metadata(&self.path)
                && md.is_dir()
            {
                fs::remove_dir_all(&self.path).map_err(|e| io_err(&self.path, e))?;
            }
            fs::rename(&self.tmp, &self.path).map_err(|e| io_err(&self.path, e))
        })();
        if res.is_err() {
            let _ = fs::remove_file(&self.tmp);
        }
        res
    }

    fn abort(mut self: Box<Self>) {
        drop(self.file.take());
        let _ = fs::remove_file(&self.tmp);
    }
}

impl Endpoint for LocalDir {
    fn describe(&self) -> String {
        self.root.display().to_string()
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
        self.counters.meta(1);
        let p = self.full(path);
        // The root may be a symlink to the tree; entries are not followed.
        let md = if path.is_empty() {
            fs::metadata(&p)
        } else {
            fs::symlink_metadata(&p)
        };
        match md {
            Ok(md) => Ok(Some(item_of(split(path).1.to_string(), &md))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&p, e)),
        }
    }

    fn list(&self, dir: &str) -> Result<Option<Vec<Item>>> {
        let p = self.full(dir);
        self.counters.list();
        let rd = match fs::read_dir(&p) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&p, e)),
        };
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| io_err(&p, e))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else {
                return Err(SyncError::Invalid(format!(
                    "{}: the name {:?} is not UTF-8 (rename it; sync copies UTF-8 names only)",
                    p.display(),
                    ent.file_name()
                )));
            };
            self.counters.meta(1);
            let md = match fs::symlink_metadata(ent.path()) {
                Ok(md) => md,
                // Removed since the listing.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&ent.path(), e)),
            };
            out.push(item_of(name.to_string(), &md));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Some(out))
    }

    fn open(&self, path: &str, _item: &Item) -> Result<Box<dyn Reader>> {
        let p = self.full(path);
        let file = fs::File::open(&p).map_err(|e| io_err(&p, e))?;
        Ok(Box::new(LocalReader { file, path: p }))
    }

    fn create(&self, path: &str, _item: &Item) -> Result<Box<dyn Writer + '_>> {
        let (dir, name) = split(path);
        let p = self.full(path);
        let tmp = self.full(dir).join(temp_name(name));
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, e))?;
        Ok(Box::new(LocalWriter {
            file: Some(file),
            tmp,
            path: p,
        }))
    }

    fn mkdir(&self, path: &str, item: &Item) -> Result<()> {
        let p = self.full(path);
        match fs::create_dir(&p) {
            Ok(()) => {
                let _ = fs::set_permissions(&p, fs::Permissions::from_mode(item.mode | 0o700));
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) if path.is_empty() && e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(&p).map_err(|e| io_err(&p, e))
            }
            Err(e) => Err(io_err(&p, e)),
        }
    }

    fn set_attrs(&self, path: &str, item: &Item) -> Result<()> {
        self.counters.meta(1);
        set_attrs_at(&self.full(path), item, item.kind)
    }

    fn readlink(&self, path: &str) -> Result<Vec<u8>> {
        self.counters.meta(1);
        let p = self.full(path);
        fs::read_link(&p)
            .map(|t| t.as_os_str().as_bytes().to_vec())
            .map_err(|e| io_err(&p, e))
    }

    fn symlink(&self, path: &str, target: &[u8], item: &Item) -> Result<()> {
        let (dir, name) = split(path);
        let p = self.full(path);
        let tmp = self.full(dir).join(temp_name(name));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &tmp)
            .map_err(|e| io_err(&tmp, e))?;
        set_attrs_at(&tmp, item, Kind::Symlink)?;
        if let Ok(md) = fs::symlink_metadata(&p)
            && md.is_dir()
        {
            fs::remove_dir_all(&p).map_err(|e| io_err(&p, e))?;
        }
        fs::rename(&tmp, &p).map_err(|e| io_err(&p, e))
    }

    fn link(&self, existing: &str, path: &str) -> Result<()> {
        let p = self.full(path);
        self.clear(&p)?;
        fs::hard_link(self.full(existing), &p).map_err(|e| io_err(&p, e))
    }

    fn remove(&self, path: &str, kind: Kind) -> Result<()> {
        self.remove_path(&self.full(path), kind)
    }

    fn xattrs(&self, path: &str, _listed: Option<&Item>) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.counters.meta(1);
        list_xattrs(&self.full(path))
    }

    fn set_xattrs(&self, path: &str, want: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
        set_xattrs_at(&self.full(path), want)
    }
}
