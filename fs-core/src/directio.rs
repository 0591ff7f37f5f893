//! Writes of new files that skip the page cache (O_DIRECT) for their whole pages: object files
//! of the local-directory store and the block files of the disk cache (cached and staged).
//!
//! A buffered write copies every byte into fresh page-cache pages. The file is not read
//! again soon (an object is read after the page cache was dropped or evicted; a staged block
//! once, by its upload; a cached block once the memory tier and the mount's page cache no
//! longer hold it), so those pages only cost: on a virtual machine whose freed
//! memory goes back to the host (virtio-balloon free page reporting, as on this repository's
//! test machine) each fresh page also costs a fault in the host, and writers of the local
//! directory ran at 400-500 MiB/s with 98 % of both cores busy, half of it in that copy.
//! With O_DIRECT the bytes go from a reused, aligned bounce buffer to the device: 1.0-1.3
//! GiB/s with half the CPU idle (docs/ARCHITECTURE.md, write path).
//!
//! Only on ext4 and xfs, where O_DIRECT is plain and fast: other file systems (tmpfs, overlay,
//! NFS, FUSE, ...) refuse it or make every write a synchronous round trip. A file system that
//! refuses it once gets buffered writes from then on. Durability is unchanged: the bytes are
//! on the device when the write returns, and callers still fsync file and directory when
//! asked to.

use std::fs::File;
use std::io::{self, ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

/// Writes of at least this many bytes use O_DIRECT; smaller ones are buffered (small files
/// are read back soon more often, and a round trip to the device would dominate).
pub const DIRECT_MIN: usize = 1 << 20;
/// Alignment of O_DIRECT buffers, lengths and file offsets (covers 512-byte and 4 KiB sectors).
const ALIGN: usize = 4096;
/// Size of the aligned bounce buffers the writes go through (block buffers are not
/// page-aligned).
const BOUNCE_LEN: usize = 1 << 20;

/// `statfs` magic numbers of the file systems that get O_DIRECT writes.
const DIRECT_FS: [i64; 2] = [
    0xEF53,      // ext2/3/4
    0x5846_5342, // xfs
];

/// A page-aligned buffer of [`BOUNCE_LEN`] bytes.
struct Bounce(NonNull<u8>);

// SAFETY: the buffer is plain memory owned by this value alone.
unsafe impl Send for Bounce {}

impl Bounce {
    fn layout() -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(BOUNCE_LEN, ALIGN).expect("valid layout")
    }

    fn new() -> Bounce {
        // Zeroed once, so the slice handed out is always initialized memory; buffers are reused.
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(Self::layout()) };
        Bounce(NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout())))
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: the allocation is BOUNCE_LEN initialized bytes, owned and exclusively
        // borrowed here.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_ptr(), BOUNCE_LEN) }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { std::alloc::dealloc(self.0.as_ptr(), Self::layout()) };
    }
}

/// The `statfs` magic number of the file system holding `path` or, when it does not exist
/// yet, its nearest existing ancestor.
fn fs_type(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt;
    let at = path.ancestors().find(|p| p.exists())?;
    let c = std::ffi::CString::new(at.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs fills the zeroed struct, given a valid C string path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
}

/// O_DIRECT writes of new files under one directory, with their bounce buffers.
pub struct DirectWrites {
    root: PathBuf,
    /// Decided from the root's file system on the first big write; off for good once the
    /// file system refused O_DIRECT.
    on: OnceLock<AtomicBool>,
    idle: Mutex<Vec<Bounce>>,
    /// Most idle bounce buffers kept (about the number of concurrent writers).
    keep: usize,
}

impl std::fmt::Debug for DirectWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectWrites")
            .field("root", &self.root)
            .field("on", &self.on.get().map(|b| b.load(Ordering::Relaxed)))
            .finish()
    }
}

impl DirectWrites {
    /// Writes of files under `root`, keeping at most `keep` idle bounce buffers (1 MiB each).
    pub fn new(root: PathBuf, keep: usize) -> Self {
        DirectWrites {
            root,
            on: OnceLock::new(),
            idle: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// Whether big writes use O_DIRECT: the root is on ext4 or xfs and that file system has
    /// not refused it.
    pub fn enabled(&self) -> bool {
        self.on
            .get_or_init(|| {
                AtomicBool::new(fs_type(&self.root).is_some_and(|t| DIRECT_FS.contains(&t)))
            })
            .load(Ordering::Relaxed)
    }

    /// Write all of `data` at the offset of `file`, a new file opened for writing at a
    /// multiple of 4 KiB (its start): when enabled and `data` is at least [`DIRECT_MIN`]
    /// bytes, its whole 4 KiB pages with O_DIRECT, the rest buffered. The file is back in
    /// buffered mode afterwards (callers may append, e.g. a trailer).
    pub fn write_all(&self, mut file: &File, data: &[u8]) -> io::Result<()> {
        let direct = if data.len() >= DIRECT_MIN && self.enabled() {
            self.write_pages(file, data)?
        } else {
            0
        };
        file.write_all(&data[direct..])
    }

    /// The O_DIRECT part of [`Self::write_all`]: how many bytes it wrote (the file offset is
    /// there); 0 when the file system refused.
    fn write_pages(&self, mut file: &File, data: &[u8]) -> io::Result<usize> {
        let fd = file.as_raw_fd();
        // SAFETY: plain fcntl calls on an open file descriptor.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) } < 0 {
            self.refused(&io::Error::last_os_error());
            return Ok(0);
        }
        // Allocate the whole range first: O_DIRECT writes allocate as they go, and with
        // several writers at once a 4 MiB file ended up in 2-3 extents apart (buffered writes
        // are allocated at writeback, in one), which slowed reading it back. A hint: a file
        // system without fallocate just allocates as it writes.
        // SAFETY: plain syscalls on an open file descriptor.
        unsafe {
            let at = libc::lseek(fd, 0, libc::SEEK_CUR);
            if at >= 0 {
                libc::fallocate(fd, 0, at, data.len() as libc::off_t);
            }
        }
        let mut buf = self.idle.lock().pop().unwrap_or_else(Bounce::new);
        let whole = data.len() / ALIGN * ALIGN;
        let mut done = 0;
        let mut result = Ok(());
        while done < whole {
            let n = (whole - done).min(BOUNCE_LEN);
            let piece = &mut buf.as_mut()[..n];
            piece.copy_from_slice(&data[done..done + n]);
            match file.write(piece) {
                Ok(w) => {
                    done += w;
                    if w < n {
                        break; // the rest buffered, from where the file offset is
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.refused(&e);
                    break;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        {
            let mut idle = self.idle.lock();
            if idle.len() < self.keep {
                idle.push(buf);
            }
        }
        // SAFETY: as above; back to buffered writes for the rest.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 && result.is_ok() {
            result = Err(io::Error::last_os_error());
        }
        result.map(|()| done)
    }

    fn refused(&self, e: &io::Error) {
        if let Some(on) = self.on.get()
            && on.swap(false, Ordering::Relaxed)
        {
            tracing::info!(
                dir = %self.root.display(),
                "the file system refused O_DIRECT ({e}); big files are written through the page cache from now on"
            );
        }
    }

    /// Idle bounce buffers held.
    pub fn idle_buffers(&self) -> usize {
        self.idle.lock().len()
    }
}

/// Which 4 KiB pages of the file at `path` are in the page cache (tests).
#[doc(hidden)]
pub fn resident_pages(path: &Path) -> Vec<bool> {
    let file = File::open(path).expect("open");
    let len = file.metadata().expect("metadata").len() as usize;
    if len == 0 {
        return Vec::new();
    }
    // SAFETY: a read-only shared mapping of an open file, unmapped below; mincore fills one
    // byte per page of it.
    unsafe {
        let base = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(base, libc::MAP_FAILED, "mmap {}", path.display());
        let mut v = vec![0u8; len.div_ceil(ALIGN)];
        let r = libc::mincore(base, len, v.as_mut_ptr());
        libc::munmap(base, len);
        assert_eq!(r, 0, "mincore {}", path.display());
        v.into_iter().map(|b| b & 1 == 1).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Extents of the file at `path` (FS_IOC_FIEMAP with no room for records: the count).
    fn extents(path: &Path) -> u32 {
        #[repr(C)]
        struct Fiemap {
            start: u64,
            length: u64,
            flags: u32,
            mapped_extents: u32,
            extent_count: u32,
            reserved: u32,
        }
        const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
        const FIEMAP_FLAG_SYNC: u32 = 1;
        let f = File::open(path).unwrap();
        let mut m = Fiemap {
            start: 0,
            length: u64::MAX,
            flags: FIEMAP_FLAG_SYNC,
            mapped_extents: 0,
            extent_count: 0,
            reserved: 0,
        };
        // SAFETY: FIEMAP with extent_count 0 only fills the header passed in.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP, &mut m) };
        assert_eq!(r, 0, "FIEMAP {}", path.display());
        m.mapped_extents
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn on_ext4_or_xfs_whole_pages_skip_the_page_cache_and_the_rest_is_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let on = fs_type(dir.path()).is_some_and(|t| DIRECT_FS.contains(&t));
        let dw = DirectWrites::new(dir.path().join("not-yet"), 2);
        assert_eq!(
            dw.enabled(),
            on,
            "decided from the nearest existing ancestor"
        );
        if !on {
            eprintln!("skipped: {} is not on ext4 or xfs", dir.path().display());
            return;
        }
        // 3 MiB and a piece of a page, then a trailer appended buffered.
        let data = pattern((3 << 20) + 1234);
        let path = dir.path().join("big");
        let f = File::create(&path).unwrap();
        dw.write_all(&f, &data).unwrap();
        (&f).write_all(b"TRLR").unwrap();
        drop(f);
        let pages = resident_pages(&path);
        assert_eq!(pages.len(), 769);
        assert!(
            pages[..768].iter().all(|r| !r),
            "whole pages went to the device"
        );
        assert!(pages[768], "the tail and the trailer are buffered");
        let back = std::fs::read(&path).unwrap();
        assert_eq!(&back[..data.len()], &data[..]);
        assert_eq!(&back[data.len()..], b"TRLR");
        assert_eq!(
            dw.idle_buffers(),
            1,
            "the bounce buffer is kept for the next write"
        );
        assert_eq!(extents(&path), 1, "allocated in one piece");

        // Below DIRECT_MIN: buffered.
        let small = dir.path().join("small");
        let f = File::create(&small).unwrap();
        dw.write_all(&f, &data[..DIRECT_MIN - 1]).unwrap();
        drop(f);
        assert!(resident_pages(&small).iter().all(|r| *r));
        assert_eq!(std::fs::read(&small).unwrap(), &data[..DIRECT_MIN - 1]);
    }

    #[test]
    fn concurrent_big_writes_each_get_one_extent() {
        let dir = tempfile::tempdir().unwrap();
        let dw = DirectWrites::new(dir.path().to_path_buf(), 4);
        if !dw.enabled() {
            eprintln!("skipped: {} is not on ext4 or xfs", dir.path().display());
            return;
        }
        let data = pattern(4 << 20);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (dw, data, dir) = (&dw, &data, dir.path());
                s.spawn(move || {
                    for i in 0..4 {
                        let f = File::create(dir.join(format!("f{t}-{i}"))).unwrap();
                        dw.write_all(&f, data).unwrap();
                    }
                });
            }
        });
        for t in 0..4 {
            for i in 0..4 {
                let p = dir.path().join(format!("f{t}-{i}"));
                assert_eq!(extents(&p), 1, "{} in one piece", p.display());
                assert_eq!(std::fs::read(&p).unwrap(), data);
            }
        }
    }

    #[test]
    fn writes_on_tmpfs_are_buffered_and_whole() {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("skipped: no /dev/shm");
            return;
        };
        let dw = DirectWrites::new(dir.path().to_path_buf(), 2);
        assert!(!dw.enabled(), "tmpfs does not get O_DIRECT writes");
        let data = pattern((2 << 20) + 7);
        let path = dir.path().join("f");
        dw.write_all(&File::create(&path).unwrap(), &data).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert_eq!(dw.idle_buffers(), 0);
    }

    #[test]
    fn a_file_system_that_refuses_o_direct_turns_it_off_and_nothing_is_lost() {
        // Forced on for a file descriptor that refuses O_DIRECT (a socket).
        let (r, w) = std::os::unix::net::UnixStream::pair().unwrap();
        // SAFETY: the descriptor moves from the stream into the file.
        let w = unsafe {
            use std::os::fd::{FromRawFd, IntoRawFd};
            File::from_raw_fd(w.into_raw_fd())
        };
        let dw = DirectWrites::new(PathBuf::from("/"), 2);
        dw.on.get_or_init(|| AtomicBool::new(true));
        let data = pattern(DIRECT_MIN + 10);
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            io::Read::read_to_end(&mut &r, &mut out).unwrap();
            out
        });
        dw.write_all(&w, &data).unwrap();
        drop(w);
        assert_eq!(reader.join().unwrap(), data, "every byte arrived");
        assert!(!dw.enabled(), "refused once: off for good");
    }
}
