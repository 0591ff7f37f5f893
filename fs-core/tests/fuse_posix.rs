//! POSIX behaviour through a real FUSE mount: every test formats a fresh volume, mounts it with
//! the `strata` binary in a child process (see `common::Mount`) and drives it with plain
//! system calls, as applications do.
//!
//! Needs /dev/fuse and root (some tests switch to uid/gid 1000 for permission checks).
//! Run: `cargo test -p fs-core --test fuse_posix`.

mod common;

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Mount, MountConfig, cstr, errname, errno};

const MIB: u64 = 1 << 20;
const RENAME_NOREPLACE: libc::c_uint = 1;
const RENAME_EXCHANGE: libc::c_uint = 2;

// ---------------------------------------------------------------------------- helpers

/// Deterministic pseudo-random bytes (xorshift64*), so failures are reproducible.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// Panic with the errno when a libc call returned -1.
fn ok(rc: libc::c_int, what: &str) -> libc::c_int {
    if rc < 0 {
        panic!("{what} failed: {}", errname(errno()));
    }
    rc
}

/// Assert that a libc call failed with `want`.
fn fails_with(rc: i64, want: i32, what: &str) {
    let got = if rc < 0 { errno() } else { 0 };
    assert_eq!(
        got,
        want,
        "{what}: expected {}, got {} (rc {rc})",
        errname(want),
        errname(got)
    );
}

/// Assert that an io::Error carries `want`.
fn io_err<T: std::fmt::Debug>(r: std::io::Result<T>, want: i32, what: &str) {
    match r {
        Ok(v) => panic!(
            "{what}: expected {}, but it succeeded ({v:?})",
            errname(want)
        ),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(want),
            "{what}: expected {}, got {e}",
            errname(want)
        ),
    }
}

fn read_all(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

fn pread(f: &File, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f.read_at(&mut buf[done..], off + done as u64).unwrap();
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    buf
}

/// Map `len` bytes of `f` at `off` (`prot`, `flags` as for mmap(2)); fails the test if
/// mmap does. The caller unmaps.
fn map(f: &File, off: i64, len: usize, prot: i32, flags: i32) -> *mut libc::c_void {
    // SAFETY: a new mapping of an open descriptor; nothing existing is touched.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, f.as_raw_fd(), off) };
    assert_ne!(ptr, libc::MAP_FAILED, "mmap: {}", errname(errno()));
    ptr
}

fn assert_zeros(data: &[u8], what: &str) {
    if let Some(i) = data.iter().position(|&b| b != 0) {
        panic!("{what}: byte {i} is {:#x}, expected a zero", data[i]);
    }
}

/// Compare without printing megabytes on failure.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#x}, want {:#x}",
            got[i], want[i]
        );
    }
}

fn stat(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

fn statvfs(p: &Path) -> libc::statvfs {
    // SAFETY: zeroed is a valid statvfs; the path is a valid C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    ok(
        unsafe { libc::statvfs(cstr(p).as_ptr(), &mut s) },
        "statvfs",
    );
    s
}

fn used_inodes(p: &Path) -> u64 {
    let s = statvfs(p);
    s.f_files - s.f_ffree
}

fn used_bytes(p: &Path) -> u64 {
    let s = statvfs(p);
    (s.f_blocks - s.f_bfree) * s.f_frsize
}

/// Poll `f` until it is true or `timeout` passes; returns the last value.
fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Run a shell snippet as uid/gid 1000 (no supplementary groups); returns (success, stderr).
fn sh_as_user(script: &str) -> (bool, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .uid(1000)
        .gid(1000)
        .env("LC_ALL", "C")
        .output()
        .expect("running sh as uid 1000");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn q(p: &Path) -> String {
    format!("'{}'", p.display())
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> i64 {
    let (a, b) = (cstr(from), cstr(to));
    // SAFETY: valid C strings; AT_FDCWD with absolute paths.
    unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    }
}

fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> i64 {
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer.
    unsafe {
        libc::setxattr(
            cstr(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        ) as i64
    }
}

fn getxattr(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let n = CString::new(name).unwrap();
    let c = cstr(p);
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: valid C strings and buffer.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(errno());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn listxattr(p: &Path) -> HashSet<String> {
    let c = cstr(p);
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: valid C string and buffer.
    let r = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    ok(r as i32, "listxattr");
    buf.truncate(r as usize);
    buf.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// Entries of a directory with libc readdir, including "." and "..": (name, d_ino).
fn readdir_raw(p: &Path) -> Vec<(Vec<u8>, u64)> {
    let c = cstr(p);
    let mut out = Vec::new();
    // SAFETY: opendir/readdir/closedir on a valid path; d_name is NUL-terminated.
    unsafe {
        let d = libc::opendir(c.as_ptr());
        assert!(
            !d.is_null(),
            "opendir {}: {}",
            p.display(),
            errname(errno())
        );
        loop {
            let e = libc::readdir(d);
            if e.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*e).d_name.as_ptr())
                .to_bytes()
                .to_vec();
            out.push((name, (*e).d_ino));
        }
        libc::closedir(d);
    }
    out
}

// ---------------------------------------------------------------------------- regular files

#[test]
fn file_create_write_read() {
    let m = Mount::new();
    let p = m.p("hello.txt");
    fs::write(&p, b"hello, strata\n").unwrap();
    assert_eq!(read_all(&p), b"hello, strata\n");
    assert_eq!(stat(&p).len(), 14);
    assert!(stat(&p).file_type().is_file());

    // Larger than a block (4 MiB) and written in odd-sized pieces.
    let big = pattern(1, (9 * MIB + 12345) as usize);
    {
        let mut f = File::create(m.p("big")).unwrap();
        for c in big.chunks(333_333) {
            f.write_all(c).unwrap();
        }
    }
    assert_eq!(stat(&m.p("big")).len(), big.len() as u64);
    assert_same(&read_all(&m.p("big")), &big, "big file read back");
    // Read in odd pieces too.
    let f = File::open(m.p("big")).unwrap();
    for &(off, len) in &[
        (0u64, 1usize),
        (4 * MIB - 3, 7),
        (5 * MIB + 1, 1 << 20),
        (big.len() as u64 - 10, 100),
    ] {
        let got = pread(&f, off, len);
        let end = (off as usize + len).min(big.len());
        assert_same(
            &got,
            &big[off as usize..end],
            &format!("pread({off}, {len})"),
        );
    }
    // A write across the 64 MiB chunk boundary, and one just after it.
    let across = pattern(2, (3 * MIB + 5) as usize);
    {
        let f = File::create(m.p("across")).unwrap();
        f.write_all_at(&across, 63 * MIB - 1).unwrap();
        f.write_all_at(b"after", 64 * MIB + 4 * MIB).unwrap();
    }
    let f = File::open(m.p("across")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 68 * MIB + 5);
    assert_same(
        &pread(&f, 63 * MIB - 1, across.len()),
        &across,
        "write across the chunk boundary",
    );
    assert_eq!(pread(&f, 68 * MIB, 5), b"after");
    assert_zeros(
        &pread(&f, 66 * MIB + 4, MIB as usize),
        "hole after the boundary write",
    );
    drop(f);
    // Empty file.
    File::create(m.p("empty")).unwrap();
    assert_eq!(stat(&m.p("empty")).len(), 0);
    assert_eq!(read_all(&m.p("empty")), b"");
}

#[test]
fn file_random_writes() {
    let m = Mount::new();
    let p = m.p("random");
    let size = 6 * MIB as usize;
    let mut model = vec![0u8; 0];
    let mut rng = Rng::new(42);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .unwrap();
    for i in 0..600 {
        let off = rng.below(size as u64) as usize;
        let len = 1 + rng.below(if i % 10 == 0 { 300_000 } else { 5000 }) as usize;
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        f.write_all_at(&data, off as u64).unwrap();
        if model.len() < off + len {
            model.resize(off + len, 0);
        }
        model[off..off + len].copy_from_slice(&data);
        if i % 97 == 0 {
            f.sync_all().unwrap();
        }
        if i % 150 == 149 {
            // Read back through the same descriptor while writes are pending.
            assert_same(
                &pread(&f, 0, model.len()),
                &model,
                &format!("read after {i} writes"),
            );
        }
    }
    assert_eq!(f.metadata().unwrap().len(), model.len() as u64);
    drop(f);
    assert_same(&read_all(&p), &model, "after close");
}

#[test]
fn file_concurrent_writers() {
    // Four threads write interleaved 64 KiB stripes of one file, two through a shared
    // descriptor and two through their own.
    let m = Mount::new();
    let p = m.p("striped");
    let shared = std::sync::Arc::new(
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .unwrap(),
    );
    const STRIPE: usize = 64 << 10;
    const ROUNDS: usize = 40;
    let mut handles = Vec::new();
    for t in 0..4usize {
        let shared = shared.clone();
        let p = p.clone();
        handles.push(std::thread::spawn(move || {
            let own = OpenOptions::new().write(true).open(&p).unwrap();
            for r in 0..ROUNDS {
                let idx = r * 4 + t;
                let data = pattern(idx as u64 + 1000, STRIPE);
                let f = if t % 2 == 0 { &*shared } else { &own };
                f.write_all_at(&data, (idx * STRIPE) as u64).unwrap();
                if r % 10 == 9 {
                    f.sync_data().unwrap();
                }
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    drop(shared);
    let got = read_all(&p);
    assert_eq!(got.len(), 4 * ROUNDS * STRIPE);
    for idx in 0..4 * ROUNDS {
        assert_same(
            &got[idx * STRIPE..(idx + 1) * STRIPE],
            &pattern(idx as u64 + 1000, STRIPE),
            &format!("stripe {idx}"),
        );
    }
}

#[test]
fn file_sparse() {
    let m = Mount::new();
    let p = m.p("sparse");
    let off = 100 * MIB;
    let data = pattern(7, 4096);
    {
        let f = File::create(&p).unwrap();
        f.write_all_at(&data, off).unwrap();
    }
    let st = stat(&p);
    assert_eq!(st.len(), off + 4096);
    let f = File::open(&p).unwrap();
    assert_zeros(&pread(&f, 0, MIB as usize), "hole at 0");
    assert_zeros(&pread(&f, 50 * MIB - 100, 200_000), "hole at 50 MiB");
    assert_zeros(
        &pread(&f, 64 * MIB - 1000, 2000),
        "hole across the 64 MiB chunk boundary",
    );
    let edge = pread(&f, off - 100, 200);
    assert_zeros(&edge[..100], "hole just before the data");
    assert_same(&edge[100..], &data[..100], "data after the hole");
    assert_same(&pread(&f, off, 4096), &data, "data at 100 MiB");
    assert_eq!(pread(&f, off + 4096, 10).len(), 0, "read at EOF");
    // st_blocks: counts at least the written data and at most the apparent size.
    let blocks = st.blocks();
    assert!(
        blocks * 512 >= 4096,
        "st_blocks {blocks} does not cover the 4 KiB written"
    );
    assert!(
        blocks * 512 <= (off + 4096).div_ceil(4096) * 4096,
        "st_blocks {blocks} is larger than the file"
    );
    eprintln!(
        "sparse file of {} bytes with 4 KiB of data: st_blocks = {blocks}",
        st.len()
    );
}

#[test]
fn file_append_two_fds() {
    let m = Mount::new();
    let p = m.p("log");
    fs::write(&p, b"start\n").unwrap();
    let mut a = OpenOptions::new().append(true).open(&p).unwrap();
    let mut b = OpenOptions::new().append(true).open(&p).unwrap();
    let mut want = b"start\n".to_vec();
    for i in 0..200 {
        let ra = format!("A{i:04}\n");
        let rb = format!("B{i:04}-{}\n", "x".repeat(i % 13));
        a.write_all(ra.as_bytes()).unwrap();
        b.write_all(rb.as_bytes()).unwrap();
        want.extend_from_slice(ra.as_bytes());
        want.extend_from_slice(rb.as_bytes());
    }
    // O_APPEND ignores the position: a seek to 0 does not make the next write overwrite.
    a.seek(SeekFrom::Start(0)).unwrap();
    a.write_all(b"end\n").unwrap();
    want.extend_from_slice(b"end\n");
    drop((a, b));
    let got = read_all(&p);
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );
}

/// Write-only opens bypass the page cache (direct I/O); a reader holding cached pages of the
/// file, by read() or by a shared mapping, must still see what they write, and the size must
/// follow.
#[test]
fn file_write_only_writes_reach_cached_readers() {
    let m = Mount::new();
    let p = m.p("wo");
    let old = pattern(11, 3 * MIB as usize);
    fs::write(&p, &old).unwrap();
    let r = File::open(&p).unwrap();
    assert_same(
        &pread(&r, 0, old.len()),
        &old,
        "first read (fills the page cache)",
    );
    let len = old.len();
    let mapping = map(&r, 0, len, libc::PROT_READ, libc::MAP_SHARED);
    // SAFETY: `len` bytes mapped just above, unmapped below.
    let mapped = || unsafe { std::slice::from_raw_parts(mapping as *const u8, len) }.to_vec();
    assert_same(&mapped(), &old, "mapping before the writes");

    let w = OpenOptions::new().write(true).open(&p).unwrap();
    let mid = pattern(12, 100_000);
    w.write_all_at(&mid, MIB + 12_345).unwrap();
    let tail = pattern(13, MIB as usize);
    w.write_all_at(&tail, old.len() as u64 - 1000).unwrap();
    let mut want = old.clone();
    want[MIB as usize + 12_345..MIB as usize + 12_345 + mid.len()].copy_from_slice(&mid);
    want.truncate(old.len() - 1000);
    want.extend_from_slice(&tail);
    assert_eq!(
        r.metadata().unwrap().len(),
        want.len() as u64,
        "size seen by the reader"
    );
    assert_same(
        &pread(&r, 0, want.len()),
        &want,
        "reader after the writes, writer open",
    );
    assert_same(&mapped(), &want[..len], "mapping after the writes");
    drop(w);
    assert_same(
        &pread(&r, 0, want.len()),
        &want,
        "reader after the writer closed",
    );
    assert_same(&read_all(&p), &want, "a new reader");
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(mapping, len) };

    // Write-only and O_APPEND: appends land at the end as the kernel knows it.
    let mut a = OpenOptions::new().append(true).open(&p).unwrap();
    a.write_all(b"appended").unwrap();
    drop(a);
    want.extend_from_slice(b"appended");
    assert_same(
        &pread(&r, 0, want.len() + 10),
        &want,
        "reader after an append",
    );
}

#[test]
fn file_o_trunc() {
    let m = Mount::new();
    let p = m.p("t");
    fs::write(&p, pattern(3, MIB as usize)).unwrap();
    let ino = stat(&p).ino();
    {
        let mut f = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        assert_eq!(
            f.metadata().unwrap().len(),
            0,
            "size right after open(O_TRUNC)"
        );
        f.write_all(b"abc").unwrap();
    }
    assert_eq!(read_all(&p), b"abc");
    assert_eq!(stat(&p).ino(), ino, "O_TRUNC keeps the inode");
    // O_TRUNC with pending (unflushed) data from another descriptor.
    let w = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    w.write_all_at(&pattern(4, 100_000), 0).unwrap();
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    assert_eq!(stat(&p).len(), 0);
    assert_eq!(
        pread(&w, 0, 10).len(),
        0,
        "read after O_TRUNC by another descriptor"
    );
    drop(w);
    assert_eq!(stat(&p).len(), 0, "size after the earlier writer closed");
}

#[test]
fn file_o_excl() {
    let m = Mount::new();
    let p = m.p("x");
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap();
    io_err(
        OpenOptions::new().write(true).create_new(true).open(&p),
        libc::EEXIST,
        "O_CREAT|O_EXCL on a file",
    );
    fs::create_dir(m.p("d")).unwrap();
    io_err(
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(m.p("d")),
        libc::EEXIST,
        "O_CREAT|O_EXCL on a dir",
    );
    std::os::unix::fs::symlink("nowhere", m.p("l")).unwrap();
    io_err(
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(m.p("l")),
        libc::EEXIST,
        "O_CREAT|O_EXCL on a dangling symlink",
    );
    // O_CREAT without O_EXCL opens the existing file.
    fs::write(&p, b"data").unwrap();
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .unwrap();
    assert_eq!(read_all(&p), b"data");
}

#[test]
fn file_truncate_grow_shrink() {
    let m = Mount::new();
    let p = m.p("t");
    let data = pattern(5, (5 * MIB + 100) as usize);
    fs::write(&p, &data).unwrap();

    // truncate(2) shrink inside the second block, then grow.
    let cut = 4 * MIB + 7;
    let c = cstr(&p);
    ok(
        unsafe { libc::truncate(c.as_ptr(), cut as i64) },
        "truncate shrink",
    );
    assert_eq!(stat(&p).len(), cut);
    assert_same(&read_all(&p), &data[..cut as usize], "after shrink");
    ok(
        unsafe { libc::truncate(c.as_ptr(), (6 * MIB) as i64) },
        "truncate grow",
    );
    let got = read_all(&p);
    assert_eq!(got.len() as u64, 6 * MIB);
    assert_same(
        &got[..cut as usize],
        &data[..cut as usize],
        "kept part after regrow",
    );
    assert_zeros(&got[cut as usize..], "beyond the old end after regrow");

    // ftruncate on an open descriptor, with writes pending before it.
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    f.write_all_at(b"0123456789", 40).unwrap();
    f.set_len(45).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 45);
    f.set_len(5000).unwrap();
    let got = pread(&f, 0, 10_000);
    assert_eq!(got.len(), 5000);
    assert_same(&got[..40], &data[..40], "prefix");
    assert_eq!(&got[40..45], b"01234");
    assert_zeros(&got[45..], "after ftruncate shrink + grow");
    // Write at the end of the regrown region, then shrink to 0 and grow again.
    f.write_all_at(b"tail", 4996).unwrap();
    f.write_all_at(b"mid", 100).unwrap();
    let got = pread(&f, 0, 10_000);
    assert_eq!(&got[4996..], b"tail", "written after a shrink + grow");
    assert_eq!(&got[100..103], b"mid");
    assert_zeros(&got[103..4996], "between the new writes");
    f.set_len(0).unwrap();
    f.set_len(100).unwrap();
    assert_zeros(&pread(&f, 0, 100), "after truncate to 0 and grow");
    drop(f);
    assert_zeros(&read_all(&p), "after close");
    assert_eq!(stat(&p).len(), 100);

    // Truncating a directory fails.
    fs::create_dir(m.p("d")).unwrap();
    fails_with(
        unsafe { libc::truncate(cstr(m.p("d")).as_ptr(), 0) } as i64,
        libc::EISDIR,
        "truncate a directory",
    );
}

#[test]
fn file_fallocate() {
    let m = Mount::new();
    // Default mode on an empty file: grows it, reads as zeros.
    let p = m.p("alloc");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .unwrap();
    ok(
        unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, MIB as i64) },
        "fallocate(0, 1 MiB)",
    );
    assert_eq!(f.metadata().unwrap().len(), MIB);
    assert_zeros(&pread(&f, 0, MIB as usize), "fallocated range");
    // Default mode inside the file does not shrink it.
    ok(
        unsafe { libc::fallocate(f.as_raw_fd(), 0, 100, 100) },
        "fallocate inside",
    );
    assert_eq!(f.metadata().unwrap().len(), MIB);
    drop(f);

    // KEEP_SIZE beyond EOF: the size does not change.
    let p2 = m.p("keep");
    fs::write(&p2, b"abcdef").unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p2).unwrap();
    ok(
        unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, 8 * MIB as i64) },
        "fallocate KEEP_SIZE",
    );
    assert_eq!(f.metadata().unwrap().len(), 6);
    assert_eq!(pread(&f, 0, 100), b"abcdef");
    drop(f);
    assert_eq!(stat(&p2).len(), 6);

    // PUNCH_HOLE|KEEP_SIZE: the range reads as zeros, the rest is intact, size unchanged.
    let p3 = m.p("punch");
    let data = pattern(9, (2 * MIB + 333) as usize);
    fs::write(&p3, &data).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p3).unwrap();
    let (ho, hl) = (4096u64 + 17, 65536u64 * 3 + 5);
    ok(
        unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                ho as i64,
                hl as i64,
            )
        },
        "fallocate PUNCH_HOLE|KEEP_SIZE",
    );
    assert_eq!(
        f.metadata().unwrap().len(),
        data.len() as u64,
        "size after punch"
    );
    let mut want = data.clone();
    want[ho as usize..(ho + hl) as usize].fill(0);
    assert_same(&pread(&f, 0, data.len()), &want, "after punch (same fd)");
    drop(f);
    assert_same(&read_all(&p3), &want, "after punch (new open)");
    // Data written into the punched range afterwards is visible again.
    {
        let f = OpenOptions::new().read(true).write(true).open(&p3).unwrap();
        f.write_all_at(b"refill", ho + 100).unwrap();
        f.sync_all().unwrap();
        want[(ho + 100) as usize..(ho + 106) as usize].copy_from_slice(b"refill");
        assert_same(
            &pread(&f, 0, data.len()),
            &want,
            "write into a punched hole",
        );
    }
    // ZERO_RANGE inside the file zeroes it; without KEEP_SIZE past EOF it also grows the file.
    {
        let f = OpenOptions::new().read(true).write(true).open(&p3).unwrap();
        ok(
            unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_ZERO_RANGE, 1000, 500) },
            "ZERO_RANGE",
        );
        want[1000..1500].fill(0);
        assert_same(&pread(&f, 0, data.len()), &want, "after ZERO_RANGE");
        assert_eq!(f.metadata().unwrap().len(), data.len() as u64);
        ok(
            unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    libc::FALLOC_FL_ZERO_RANGE,
                    data.len() as i64 - 3,
                    10,
                )
            },
            "ZERO_RANGE across EOF",
        );
        want[data.len() - 3..].fill(0);
        want.resize(data.len() + 7, 0);
        assert_eq!(
            f.metadata().unwrap().len(),
            data.len() as u64 + 7,
            "ZERO_RANGE past EOF grows the file"
        );
        assert_same(
            &pread(&f, 0, want.len()),
            &want,
            "after ZERO_RANGE across EOF",
        );
        f.set_len(data.len() as u64).unwrap();
        want.truncate(data.len());
        // Default mode over existing data keeps it.
        ok(
            unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, data.len() as i64) },
            "fallocate over data",
        );
        assert_same(
            &pread(&f, 0, data.len()),
            &want,
            "fallocate mode 0 over existing data",
        );
    }
    // A hole punched past EOF changes nothing.
    let f = OpenOptions::new().read(true).write(true).open(&p3).unwrap();
    ok(
        unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                data.len() as i64 - 10,
                MIB as i64,
            )
        },
        "punch across EOF",
    );
    want[data.len() - 10..].fill(0);
    assert_eq!(f.metadata().unwrap().len(), data.len() as u64);
    assert_same(
        &pread(&f, 0, data.len() + 10),
        &want,
        "after punch across EOF",
    );
    // PUNCH_HOLE without KEEP_SIZE is invalid.
    fails_with(
        unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE, 0, 10) } as i64,
        libc::EOPNOTSUPP,
        "PUNCH_HOLE without KEEP_SIZE",
    );
}

#[test]
fn file_fsync() {
    let m = Mount::new();
    let p = m.p("synced");
    let data = pattern(11, (3 * MIB) as usize);
    let mut f = File::create(&p).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    // After fsync the data is committed: a second open sees it, and `strata info` lists it.
    assert_same(&read_all(&p), &data, "read while the writer is open");
    let info = m.info(&p);
    assert_eq!(
        info["length"].as_u64(),
        Some(data.len() as u64),
        "info: {info}"
    );
    assert!(info["slices"].as_u64().unwrap_or(0) >= 1, "info: {info}");
    f.write_all(b"more").unwrap();
    f.sync_all().unwrap();
    assert_eq!(stat(&p).len(), data.len() as u64 + 4);
    // fsync of a directory works too.
    File::open(m.path()).unwrap().sync_all().unwrap();
}

// ---------------------------------------------------------------------------- directories

#[test]
fn dir_mkdir_rmdir() {
    let m = Mount::new();
    let d = m.p("d");
    fs::create_dir(&d).unwrap();
    assert!(stat(&d).is_dir());
    assert_eq!(stat(&d).nlink(), 2, "nlink of an empty directory");
    io_err(fs::create_dir(&d), libc::EEXIST, "mkdir existing");
    fs::create_dir(d.join("sub")).unwrap();
    assert_eq!(stat(&d).nlink(), 3, "nlink with one subdirectory");
    fs::write(d.join("f"), b"x").unwrap();
    io_err(fs::remove_dir(&d), libc::ENOTEMPTY, "rmdir non-empty");
    io_err(fs::remove_dir(d.join("f")), libc::ENOTDIR, "rmdir a file");
    io_err(
        fs::remove_file(d.join("sub")),
        libc::EISDIR,
        "unlink a directory",
    );
    io_err(
        fs::create_dir(m.p("nope/x")),
        libc::ENOENT,
        "mkdir in a missing dir",
    );
    io_err(
        fs::create_dir(d.join("f/x")),
        libc::ENOTDIR,
        "mkdir under a file",
    );
    fs::remove_dir(d.join("sub")).unwrap();
    assert_eq!(stat(&d).nlink(), 2, "nlink after rmdir of the subdirectory");
    fs::remove_file(d.join("f")).unwrap();
    fs::remove_dir(&d).unwrap();
    io_err(fs::metadata(&d), libc::ENOENT, "stat after rmdir");
    // Modes are applied (umask aside).
    fs::DirBuilder::new()
        .mode(0o700)
        .create(m.p("private"))
        .unwrap();
    assert_eq!(stat(&m.p("private")).permissions().mode() & 0o777, 0o700);
    // A deep path.
    let mut deep = m.path().to_path_buf();
    for i in 0..40 {
        deep.push(format!("level{i}"));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("leaf"), b"leaf").unwrap();
    assert_eq!(read_all(&deep.join("leaf")), b"leaf");
}

#[test]
fn dir_readdir_100k() {
    let m = Mount::new();
    let d = m.p("many");
    fs::create_dir(&d).unwrap();
    const N: usize = 100_000;
    let start = Instant::now();
    let base = cstr(&d);
    // SAFETY: plain syscalls on valid C strings.
    let dfd = unsafe { libc::open(base.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
    ok(dfd, "open dir");
    for i in 0..N {
        let name = CString::new(format!("file-{i:06}")).unwrap();
        let fd = unsafe {
            libc::openat(
                dfd,
                name.as_ptr(),
                libc::O_CREAT | libc::O_WRONLY | libc::O_EXCL,
                0o644,
            )
        };
        ok(fd, "openat(O_CREAT)");
        unsafe { libc::close(fd) };
    }
    unsafe { libc::close(dfd) };
    eprintln!("created {N} files in {:?}", start.elapsed());
    let start = Instant::now();
    let raw = readdir_raw(&d);
    eprintln!("readdir of {} entries in {:?}", raw.len(), start.elapsed());
    let names: HashSet<Vec<u8>> = raw.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(raw.len(), N + 2, "entries including . and ..");
    assert_eq!(names.len(), N + 2, "duplicate names in readdir");
    assert!(names.contains(&b"."[..]) && names.contains(&b".."[..]));
    for i in 0..N {
        let n = format!("file-{i:06}");
        assert!(names.contains(n.as_bytes()), "{n} missing from readdir");
    }
    // std's iterator (getdents in its own buffer sizes) agrees.
    assert_eq!(fs::read_dir(&d).unwrap().count(), N);
    // d_ino of entries matches stat.
    for (n, ino) in raw.iter().filter(|(n, _)| n.starts_with(b"file-0000")) {
        let st = stat(&d.join(std::ffi::OsStr::from_bytes(n)));
        assert_eq!(st.ino(), *ino, "d_ino of {}", String::from_utf8_lossy(n));
    }
}

#[test]
fn dir_root_dot_and_dotdot() {
    let m = Mount::new();
    fs::create_dir_all(m.p("a/b")).unwrap();
    let root = readdir_raw(m.path());
    let dot = root.iter().find(|(n, _)| n == b".").map(|e| e.1);
    let dotdot = root.iter().find(|(n, _)| n == b"..").map(|e| e.1);
    assert!(
        dot.is_some() && dotdot.is_some(),
        "root listing lacks . or ..: {root:?}"
    );
    let root_ino = stat(m.path()).ino();
    assert_eq!(dot, Some(root_ino), "d_ino of . at the root");
    assert_eq!(
        dotdot,
        Some(root_ino),
        "d_ino of .. at the root (the root is its own parent)"
    );
    // ls -a shows them.
    let out = Command::new("ls").arg("-a").arg(m.path()).output().unwrap();
    assert!(out.status.success());
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert!(
        lines.contains(&".".to_string()) && lines.contains(&"..".to_string()),
        "ls -a: {lines:?}"
    );
    assert!(lines.contains(&"a".to_string()));
    // In subdirectories .. names the parent.
    let a = readdir_raw(&m.p("a"));
    assert_eq!(
        a.iter().find(|(n, _)| n == b"..").map(|e| e.1),
        Some(root_ino),
        "a/.."
    );
    let b = readdir_raw(&m.p("a/b"));
    assert_eq!(
        b.iter().find(|(n, _)| n == b"..").map(|e| e.1),
        Some(stat(&m.p("a")).ino()),
        "a/b/.."
    );
    // Path resolution inside stays inside.
    assert_eq!(stat(&m.p("a/b/../..")).ino(), root_ino);
    assert_eq!(stat(&m.p("a/./b/..")).ino(), stat(&m.p("a")).ino());
}

#[test]
fn dir_subdir_mount_root_dotdot() {
    let mut m = Mount::new();
    fs::create_dir_all(m.p("a/b/c")).unwrap();
    fs::write(m.p("a/b/inside"), b"in").unwrap();
    fs::write(m.p("a/outside"), b"out").unwrap();
    for sub in ["a/b", "a"] {
        m.umount();
        m.set_mount_args(&["--subdir", sub]);
        m.mount();
        let root_ino = stat(m.path()).ino();
        let root = readdir_raw(m.path());
        let dot = root.iter().find(|(n, _)| n == b".").map(|e| e.1);
        let dotdot = root.iter().find(|(n, _)| n == b"..").map(|e| e.1);
        assert_eq!(
            dot,
            Some(root_ino),
            "--subdir {sub}: d_ino of . at the mount root"
        );
        assert_eq!(
            dotdot,
            Some(root_ino),
            "--subdir {sub}: d_ino of .. at the mount root must not name a directory outside the mounted subtree"
        );
        // Entries inside keep distinct inode numbers, and none is the root's.
        for (n, ino) in root.iter().filter(|(n, _)| n != b"." && n != b"..") {
            assert_ne!(
                *ino,
                root_ino,
                "--subdir {sub}: entry {} has the root's inode",
                String::from_utf8_lossy(n)
            );
            let st = stat(&m.path().join(std::ffi::OsStr::from_bytes(n)));
            assert_eq!(
                st.ino(),
                *ino,
                "--subdir {sub}: d_ino vs stat of {}",
                String::from_utf8_lossy(n)
            );
        }
    }
    assert_eq!(read_all(&m.p("b/inside")), b"in");
    assert_eq!(read_all(&m.p("outside")), b"out");
    let c = readdir_raw(&m.p("b"));
    assert_eq!(
        c.iter().find(|(n, _)| n == b"..").map(|e| e.1),
        Some(stat(m.path()).ino()),
        "b/.. under --subdir a"
    );
}

// ---------------------------------------------------------------------------- rename

#[test]
fn rename_plain() {
    let m = Mount::new();
    fs::write(m.p("a"), b"content").unwrap();
    let ino = stat(&m.p("a")).ino();
    fs::rename(m.p("a"), m.p("b")).unwrap();
    io_err(fs::metadata(m.p("a")), libc::ENOENT, "old name");
    assert_eq!(stat(&m.p("b")).ino(), ino);
    assert_eq!(read_all(&m.p("b")), b"content");
    // Across directories.
    fs::create_dir(m.p("d")).unwrap();
    fs::rename(m.p("b"), m.p("d/c")).unwrap();
    assert_eq!(read_all(&m.p("d/c")), b"content");
    assert_eq!(stat(&m.p("d/c")).ino(), ino);
    let listing: Vec<_> = fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(listing, vec![std::ffi::OsString::from("d")]);
    // A directory with content across directories; its children follow.
    fs::create_dir_all(m.p("x/y")).unwrap();
    fs::write(m.p("x/y/z"), b"deep").unwrap();
    fs::rename(m.p("x"), m.p("d/x2")).unwrap();
    assert_eq!(read_all(&m.p("d/x2/y/z")), b"deep");
    assert_eq!(stat(&m.p("d")).nlink(), 3, "d gained a subdirectory");
    assert_eq!(stat(m.path()).nlink(), 3, "root: . + d + .. (x moved away)");
    // Renaming onto itself is a no-op.
    fs::rename(m.p("d/c"), m.p("d/c")).unwrap();
    assert_eq!(read_all(&m.p("d/c")), b"content");
    io_err(
        fs::rename(m.p("missing"), m.p("z")),
        libc::ENOENT,
        "rename a missing file",
    );
}

#[test]
fn rename_over_existing_file() {
    let m = Mount::new();
    fs::write(m.p("a"), b"AAAA").unwrap();
    fs::write(m.p("b"), b"BB").unwrap();
    let a_ino = stat(&m.p("a")).ino();
    let before = used_inodes(m.path());
    fs::rename(m.p("a"), m.p("b")).unwrap();
    assert_eq!(read_all(&m.p("b")), b"AAAA");
    assert_eq!(stat(&m.p("b")).ino(), a_ino);
    io_err(fs::metadata(m.p("a")), libc::ENOENT, "old name");
    assert!(
        eventually(Duration::from_secs(10), || used_inodes(m.path())
            == before - 1),
        "the replaced inode was not freed: used inodes {} before, {} after",
        before,
        used_inodes(m.path())
    );

    // Replacing a file that is still open: the open descriptor keeps its data, nlink 0.
    fs::write(m.p("c"), b"CCCCCC").unwrap();
    fs::write(m.p("d"), b"DDD").unwrap();
    let held = File::open(m.p("d")).unwrap();
    fs::rename(m.p("c"), m.p("d")).unwrap();
    assert_eq!(
        held.metadata().unwrap().nlink(),
        0,
        "replaced inode's nlink"
    );
    assert_eq!(pread(&held, 0, 100), b"DDD");
    assert_eq!(read_all(&m.p("d")), b"CCCCCC");
    let n_open = used_inodes(m.path());
    drop(held);
    assert!(
        eventually(Duration::from_secs(10), || used_inodes(m.path())
            == n_open - 1),
        "the replaced inode was not freed after the last close"
    );
    // Hard-linked target: only the name is replaced.
    fs::write(m.p("e"), b"E").unwrap();
    fs::hard_link(m.p("d"), m.p("d2")).unwrap();
    fs::rename(m.p("e"), m.p("d")).unwrap();
    assert_eq!(read_all(&m.p("d2")), b"CCCCCC");
    assert_eq!(stat(&m.p("d2")).nlink(), 1);
}

/// Opening a path while a rename keeps replacing it (save to a temporary name, rename over
/// the old file) gives the old or the new file, never ENOENT: an open of an inode deleted
/// since the kernel looked it up answers ESTALE, and the kernel looks the path up again.
#[test]
fn open_while_a_rename_replaces_the_file() {
    let m = Mount::new();
    fs::write(m.p("obj"), [b'a'; 4096]).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let renamer = {
        let (dir, stop) = (m.path().to_path_buf(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let tmp = dir.join(format!("tmp{}", i % 4));
                fs::write(&tmp, [b'a' + (i % 2) as u8; 4096]).unwrap();
                fs::rename(&tmp, dir.join("obj")).unwrap();
                i += 1;
            }
            i
        })
    };
    let (mut enoent, mut estale) = (0, 0);
    let opens = 4000;
    for _ in 0..opens {
        match fs::read(m.p("obj")) {
            Ok(b) => assert!(
                b.len() == 4096 && b.iter().all(|x| *x == b[0]),
                "read a mix of two files"
            ),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => enoent += 1,
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => estale += 1,
            Err(e) => panic!("open of a replaced path: {e}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let renames = renamer.join().unwrap();
    assert!(renames > 100, "only {renames} renames ran during the opens");
    assert_eq!(
        enoent, 0,
        "ENOENT for a path that always exists ({renames} renames)"
    );
    // Only when the kernel's second lookup raced a rename again.
    assert!(
        estale * 100 <= opens,
        "{estale} of {opens} opens gave ESTALE"
    );
}

#[test]
fn rename_dir_over_dir() {
    let m = Mount::new();
    fs::create_dir(m.p("src")).unwrap();
    fs::write(m.p("src/f"), b"in src").unwrap();
    fs::create_dir(m.p("empty")).unwrap();
    fs::create_dir(m.p("full")).unwrap();
    fs::write(m.p("full/g"), b"g").unwrap();
    fs::write(m.p("file"), b"file").unwrap();
    let src_ino = stat(&m.p("src")).ino();
    let root_links = stat(m.path()).nlink();

    io_err(
        fs::rename(m.p("src"), m.p("full")),
        libc::ENOTEMPTY,
        "dir over non-empty dir",
    );
    io_err(
        fs::rename(m.p("src"), m.p("file")),
        libc::ENOTDIR,
        "dir over file",
    );
    io_err(
        fs::rename(m.p("file"), m.p("empty")),
        libc::EISDIR,
        "file over dir",
    );

    fs::rename(m.p("src"), m.p("empty")).unwrap();
    assert_eq!(stat(&m.p("empty")).ino(), src_ino);
    assert_eq!(read_all(&m.p("empty/f")), b"in src");
    io_err(fs::metadata(m.p("src")), libc::ENOENT, "old dir name");
    assert_eq!(
        stat(m.path()).nlink(),
        root_links - 1,
        "root lost one subdirectory"
    );
    // Into another directory over an empty one.
    fs::create_dir(m.p("full/e")).unwrap();
    fs::rename(m.p("empty"), m.p("full/e")).unwrap();
    assert_eq!(read_all(&m.p("full/e/f")), b"in src");
    assert_eq!(stat(&m.p("full")).nlink(), 3);
}

#[test]
fn rename_noreplace_and_exchange() {
    let m = Mount::new();
    fs::write(m.p("a"), b"A").unwrap();
    fs::write(m.p("b"), b"B").unwrap();
    fails_with(
        renameat2(&m.p("a"), &m.p("b"), RENAME_NOREPLACE),
        libc::EEXIST,
        "RENAME_NOREPLACE onto an existing file",
    );
    assert_eq!(read_all(&m.p("a")), b"A");
    assert_eq!(read_all(&m.p("b")), b"B");
    assert_eq!(
        renameat2(&m.p("a"), &m.p("c"), RENAME_NOREPLACE),
        0,
        "NOREPLACE to a new name: {}",
        errname(errno())
    );
    assert_eq!(read_all(&m.p("c")), b"A");
    io_err(
        fs::metadata(m.p("a")),
        libc::ENOENT,
        "old name after NOREPLACE",
    );

    // Exchange two files.
    let (bi, ci) = (stat(&m.p("b")).ino(), stat(&m.p("c")).ino());
    assert_eq!(
        renameat2(&m.p("b"), &m.p("c"), RENAME_EXCHANGE),
        0,
        "RENAME_EXCHANGE: {}",
        errname(errno())
    );
    assert_eq!(read_all(&m.p("b")), b"A");
    assert_eq!(read_all(&m.p("c")), b"B");
    assert_eq!(stat(&m.p("b")).ino(), ci);
    assert_eq!(stat(&m.p("c")).ino(), bi);
    fails_with(
        renameat2(&m.p("b"), &m.p("nothing"), RENAME_EXCHANGE),
        libc::ENOENT,
        "EXCHANGE with a missing target",
    );
    fails_with(
        renameat2(&m.p("b"), &m.p("c"), RENAME_EXCHANGE | RENAME_NOREPLACE),
        libc::EINVAL,
        "EXCHANGE|NOREPLACE",
    );

    // Exchange a directory in d1 with a file in d2: the parents' link counts follow.
    fs::create_dir_all(m.p("d1/sub")).unwrap();
    fs::write(m.p("d1/sub/inner"), b"inner").unwrap();
    fs::create_dir(m.p("d2")).unwrap();
    fs::write(m.p("d2/f"), b"F").unwrap();
    assert_eq!(stat(&m.p("d1")).nlink(), 3);
    assert_eq!(stat(&m.p("d2")).nlink(), 2);
    assert_eq!(
        renameat2(&m.p("d1/sub"), &m.p("d2/f"), RENAME_EXCHANGE),
        0,
        "EXCHANGE dir <-> file: {}",
        errname(errno())
    );
    assert!(stat(&m.p("d1/sub")).is_file());
    assert_eq!(read_all(&m.p("d1/sub")), b"F");
    assert!(stat(&m.p("d2/f")).is_dir());
    assert_eq!(read_all(&m.p("d2/f/inner")), b"inner");
    assert_eq!(stat(&m.p("d1")).nlink(), 2, "d1 lost its subdirectory");
    assert_eq!(stat(&m.p("d2")).nlink(), 3, "d2 gained a subdirectory");
    let d2 = readdir_raw(&m.p("d2/f"));
    assert_eq!(
        d2.iter().find(|(n, _)| n == b"..").map(|e| e.1),
        Some(stat(&m.p("d2")).ino()),
        "`..` of the exchanged directory names its new parent"
    );
}

#[test]
fn rename_dir_into_own_subdir() {
    let m = Mount::new();
    fs::create_dir_all(m.p("a/b/c")).unwrap();
    io_err(
        fs::rename(m.p("a"), m.p("a/b/c/a")),
        libc::EINVAL,
        "rename a dir into its own subdir",
    );
    io_err(
        fs::rename(m.p("a"), m.p("a/x")),
        libc::EINVAL,
        "rename a dir into itself",
    );
    fails_with(
        renameat2(&m.p("a"), &m.p("a/b/c"), RENAME_EXCHANGE),
        libc::EINVAL,
        "exchange a dir with its descendant",
    );
    assert!(stat(&m.p("a/b/c")).is_dir());
}

// ---------------------------------------------------------------------------- links

#[test]
fn hard_links() {
    let m = Mount::new();
    fs::write(m.p("f"), b"shared").unwrap();
    fs::create_dir(m.p("d")).unwrap();
    fs::hard_link(m.p("f"), m.p("d/g")).unwrap();
    let (f, g) = (stat(&m.p("f")), stat(&m.p("d/g")));
    assert_eq!(f.ino(), g.ino());
    assert_eq!(f.nlink(), 2);
    assert_eq!(g.nlink(), 2);
    // Data is shared both ways.
    OpenOptions::new()
        .write(true)
        .open(m.p("d/g"))
        .unwrap()
        .write_all_at(b"SH", 0)
        .unwrap();
    assert_eq!(read_all(&m.p("f")), b"SHared");
    fs::hard_link(m.p("f"), m.p("h")).unwrap();
    assert_eq!(stat(&m.p("d/g")).nlink(), 3);
    io_err(
        fs::hard_link(m.p("f"), m.p("h")),
        libc::EEXIST,
        "link onto an existing name",
    );
    io_err(
        fs::hard_link(m.p("d"), m.p("d2")),
        libc::EPERM,
        "link a directory",
    );
    io_err(
        fs::hard_link(m.p("missing"), m.p("x")),
        libc::ENOENT,
        "link a missing file",
    );
    fs::remove_file(m.p("f")).unwrap();
    assert_eq!(stat(&m.p("h")).nlink(), 2);
    fs::remove_file(m.p("h")).unwrap();
    assert_eq!(stat(&m.p("d/g")).nlink(), 1);
    assert_eq!(read_all(&m.p("d/g")), b"SHared");
    // ctime changes on link (nlink is inode metadata).
    let c0 = stat(&m.p("d/g")).ctime_nsec() + stat(&m.p("d/g")).ctime() * 1_000_000_000;
    std::thread::sleep(Duration::from_millis(20));
    fs::hard_link(m.p("d/g"), m.p("k")).unwrap();
    let s = stat(&m.p("k"));
    assert!(
        s.ctime() * 1_000_000_000 + s.ctime_nsec() > c0,
        "ctime did not change on link"
    );
}

#[test]
fn symlinks() {
    let m = Mount::new();
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("d/target"), b"via link").unwrap();
    // Relative.
    std::os::unix::fs::symlink("target", m.p("d/rel")).unwrap();
    assert_eq!(fs::read_link(m.p("d/rel")).unwrap(), Path::new("target"));
    assert_eq!(read_all(&m.p("d/rel")), b"via link");
    let st = stat(&m.p("d/rel"));
    assert!(st.file_type().is_symlink());
    assert_eq!(st.len(), 6, "symlink size is the target length");
    // Relative with ..
    fs::create_dir(m.p("e")).unwrap();
    std::os::unix::fs::symlink("../d/target", m.p("e/up")).unwrap();
    assert_eq!(read_all(&m.p("e/up")), b"via link");
    // Absolute.
    let abs = m.p("d/target");
    std::os::unix::fs::symlink(&abs, m.p("abs")).unwrap();
    assert_eq!(fs::read_link(m.p("abs")).unwrap(), abs);
    assert_eq!(read_all(&m.p("abs")), b"via link");
    // Symlink to a directory, traversed.
    std::os::unix::fs::symlink("d", m.p("dl")).unwrap();
    assert_eq!(read_all(&m.p("dl/target")), b"via link");
    // Dangling.
    std::os::unix::fs::symlink("nowhere", m.p("dangling")).unwrap();
    io_err(
        File::open(m.p("dangling")),
        libc::ENOENT,
        "open a dangling symlink",
    );
    assert_eq!(
        fs::read_link(m.p("dangling")).unwrap(),
        Path::new("nowhere")
    );
    // Long target.
    let long = "x/".repeat(500) + "end";
    std::os::unix::fs::symlink(&long, m.p("long")).unwrap();
    assert_eq!(fs::read_link(m.p("long")).unwrap(), Path::new(&long));
    io_err(
        std::os::unix::fs::symlink("t", m.p("abs")),
        libc::EEXIST,
        "symlink onto an existing name",
    );
    // readlink of a non-symlink.
    io_err(
        fs::read_link(m.p("d/target")),
        libc::EINVAL,
        "readlink of a file",
    );
    // A loop.
    std::os::unix::fs::symlink("loop2", m.p("loop1")).unwrap();
    std::os::unix::fs::symlink("loop1", m.p("loop2")).unwrap();
    io_err(File::open(m.p("loop1")), libc::ELOOP, "open a symlink loop");
    // Unlinking the symlink leaves the target.
    fs::remove_file(m.p("d/rel")).unwrap();
    assert_eq!(read_all(&m.p("d/target")), b"via link");
}

#[test]
fn xattrs() {
    let m = Mount::new();
    let p = m.p("f");
    fs::write(&p, b"x").unwrap();
    assert_eq!(
        setxattr(&p, "user.a", b"1", 0),
        0,
        "setxattr: {}",
        errname(errno())
    );
    assert_eq!(setxattr(&p, "user.bin", &[0, 255, 0, 7], 0), 0);
    assert_eq!(
        setxattr(&p, "user.empty", b"", 0),
        0,
        "empty value: {}",
        errname(errno())
    );
    assert_eq!(getxattr(&p, "user.a"), Ok(b"1".to_vec()));
    assert_eq!(getxattr(&p, "user.bin"), Ok(vec![0, 255, 0, 7]));
    assert_eq!(getxattr(&p, "user.empty"), Ok(vec![]));
    let names = listxattr(&p);
    let want: HashSet<String> = ["user.a", "user.bin", "user.empty"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, want, "listxattr");
    // Size query and a too-small buffer.
    let (c, n) = (cstr(&p), CString::new("user.bin").unwrap());
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(r, 4, "size query");
    let mut small = [0u8; 2];
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), small.as_mut_ptr().cast(), 2) };
    fails_with(r as i64, libc::ERANGE, "getxattr into a small buffer");
    let r = unsafe { libc::listxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(
        r as usize,
        "user.a\0user.bin\0user.empty\0".len(),
        "listxattr size query"
    );
    // Flags.
    fails_with(
        setxattr(&p, "user.a", b"2", libc::XATTR_CREATE),
        libc::EEXIST,
        "XATTR_CREATE on an existing name",
    );
    assert_eq!(getxattr(&p, "user.a"), Ok(b"1".to_vec()));
    fails_with(
        setxattr(&p, "user.new", b"2", libc::XATTR_REPLACE),
        libc::ENODATA,
        "XATTR_REPLACE on a missing name",
    );
    assert_eq!(getxattr(&p, "user.new"), Err(libc::ENODATA));
    assert_eq!(setxattr(&p, "user.a", b"replaced", libc::XATTR_REPLACE), 0);
    assert_eq!(getxattr(&p, "user.a"), Ok(b"replaced".to_vec()));
    assert_eq!(setxattr(&p, "user.c", b"created", libc::XATTR_CREATE), 0);
    // A large value.
    let big = pattern(13, 60_000);
    assert_eq!(
        setxattr(&p, "user.big", &big, 0),
        0,
        "60 KB value: {}",
        errname(errno())
    );
    assert_eq!(getxattr(&p, "user.big").unwrap(), big);
    // Remove.
    let rn = CString::new("user.a").unwrap();
    ok(
        unsafe { libc::removexattr(c.as_ptr(), rn.as_ptr()) },
        "removexattr",
    );
    assert_eq!(getxattr(&p, "user.a"), Err(libc::ENODATA));
    fails_with(
        unsafe { libc::removexattr(c.as_ptr(), rn.as_ptr()) } as i64,
        libc::ENODATA,
        "removexattr missing",
    );
    assert!(!listxattr(&p).contains("user.a"));
    assert_eq!(getxattr(&p, "user.never"), Err(libc::ENODATA));
    // Directories carry xattrs too; names are per inode.
    fs::create_dir(m.p("d")).unwrap();
    assert_eq!(setxattr(&m.p("d"), "user.a", b"dir", 0), 0);
    assert_eq!(getxattr(&m.p("d"), "user.a"), Ok(b"dir".to_vec()));
    assert_eq!(getxattr(&p, "user.a"), Err(libc::ENODATA));
    // Hard links share them.
    fs::hard_link(&p, m.p("f2")).unwrap();
    assert_eq!(getxattr(&m.p("f2"), "user.c"), Ok(b"created".to_vec()));
    // trusted.* and security.* work for root.
    assert_eq!(
        setxattr(&p, "trusted.t", b"T", 0),
        0,
        "trusted.*: {}",
        errname(errno())
    );
    assert_eq!(getxattr(&p, "trusted.t"), Ok(b"T".to_vec()));
}

// ---------------------------------------------------------------------------- permissions

#[test]
fn permissions_non_root() {
    let m = Mount::new();
    let ro = m.p("ro");
    let rw = m.p("rw");
    fs::create_dir(&ro).unwrap();
    fs::create_dir(&rw).unwrap();
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&rw, fs::Permissions::from_mode(0o777)).unwrap();
    fs::set_permissions(m.path(), fs::Permissions::from_mode(0o755)).unwrap();

    // Writing into a root-owned 0755 directory: EACCES.
    let (okk, err) = sh_as_user(&format!("echo x > {}", q(&ro.join("f"))));
    assert!(
        !okk && err.contains("Permission denied"),
        "create in a 0755 root dir: ok={okk} stderr={err}"
    );
    io_err(fs::metadata(ro.join("f")), libc::ENOENT, "file not created");
    let (okk, err) = sh_as_user(&format!("mkdir {}", q(&ro.join("sub"))));
    assert!(
        !okk && err.contains("Permission denied"),
        "mkdir in a 0755 root dir: {err}"
    );

    // Into a 0777 directory: works, owned by the user.
    let (okk, err) = sh_as_user(&format!("echo x > {}", q(&rw.join("f"))));
    assert!(okk, "create in a 0777 dir failed: {err}");
    let st = stat(&rw.join("f"));
    assert_eq!(
        (st.uid(), st.gid()),
        (1000, 1000),
        "owner of a file created by uid 1000"
    );
    assert_eq!(read_all(&rw.join("f")), b"x\n");

    // chmod of someone else's file: EPERM.
    fs::write(rw.join("rootfile"), b"r").unwrap();
    fs::set_permissions(rw.join("rootfile"), fs::Permissions::from_mode(0o644)).unwrap();
    let (okk, err) = sh_as_user(&format!("chmod 666 {}", q(&rw.join("rootfile"))));
    assert!(
        !okk && err.contains("Operation not permitted"),
        "chmod of root's file: {err}"
    );
    assert_eq!(
        stat(&rw.join("rootfile")).permissions().mode() & 0o777,
        0o644
    );
    // chmod of one's own file works.
    let (okk, err) = sh_as_user(&format!("chmod 600 {}", q(&rw.join("f"))));
    assert!(okk, "chmod own file: {err}");
    assert_eq!(stat(&rw.join("f")).permissions().mode() & 0o777, 0o600);

    // chown by non-root: EPERM, even of one's own file to another user.
    let (okk, err) = sh_as_user(&format!("chown 0 {}", q(&rw.join("f"))));
    assert!(
        !okk && err.contains("Operation not permitted"),
        "chown by non-root: {err}"
    );
    assert_eq!(stat(&rw.join("f")).uid(), 1000);
    // Root can chown.
    std::os::unix::fs::chown(rw.join("rootfile"), Some(1000), Some(1000)).unwrap();
    assert_eq!(
        (
            stat(&rw.join("rootfile")).uid(),
            stat(&rw.join("rootfile")).gid()
        ),
        (1000, 1000)
    );
    std::os::unix::fs::chown(rw.join("rootfile"), Some(0), Some(0)).unwrap();

    // Reading a 0600 root file: EACCES.
    fs::write(m.p("secret"), b"s").unwrap();
    fs::set_permissions(m.p("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    let (okk, err) = sh_as_user(&format!("cat {}", q(&m.p("secret"))));
    assert!(
        !okk && err.contains("Permission denied"),
        "read a 0600 root file: {err}"
    );

    // utimensat(UTIME_NOW) by a writer who is not the owner: allowed; explicit times: EPERM.
    fs::write(rw.join("shared"), b"s").unwrap();
    fs::set_permissions(rw.join("shared"), fs::Permissions::from_mode(0o666)).unwrap();
    let old = filetime(&rw.join("shared"), 1_000_000_000);
    assert_eq!(stat(&rw.join("shared")).mtime(), old);
    let (okk, err) = sh_as_user(&format!("touch {}", q(&rw.join("shared"))));
    assert!(okk, "touch (UTIME_NOW) by a writer: {err}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (stat(&rw.join("shared")).mtime() - now).abs() < 60,
        "mtime after touch"
    );
    let (okk, err) = sh_as_user(&format!(
        "touch -d '2001-01-01 00:00:00' {}",
        q(&rw.join("shared"))
    ));
    assert!(
        !okk && err.contains("Operation not permitted"),
        "explicit utimes by non-owner: {err}"
    );
    // A non-writer cannot even touch with NOW.
    let (okk, err) = sh_as_user(&format!("touch {}", q(&rw.join("rootfile"))));
    assert!(
        !okk && err.contains("Permission denied"),
        "touch by a non-writer: {err}"
    );

    // Sticky 0777 directory: others cannot delete root's file.
    let st_dir = m.p("sticky");
    fs::create_dir(&st_dir).unwrap();
    fs::set_permissions(&st_dir, fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(st_dir.join("rootfile"), b"r").unwrap();
    let (okk, err) = sh_as_user(&format!("rm -f {}", q(&st_dir.join("rootfile"))));
    assert!(
        !okk && err.contains("Operation not permitted"),
        "unlink in a sticky dir: {err}"
    );
    assert!(st_dir.join("rootfile").exists());

    // A non-root write to a setuid file clears the setuid bit.
    let (okk, err) = sh_as_user(&format!(
        "echo a > {f} && chmod 4755 {f} && echo b >> {f}",
        f = q(&rw.join("suid"))
    ));
    assert!(okk, "{err}");
    assert_eq!(
        stat(&rw.join("suid")).permissions().mode() & 0o7000,
        0,
        "setuid kept after a write by the owner"
    );
}

/// Set a file's atime and mtime to `secs`; returns it.
fn filetime(p: &Path, secs: i64) -> i64 {
    let ts = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
    ];
    ok(
        unsafe { libc::utimensat(libc::AT_FDCWD, cstr(p).as_ptr(), ts.as_ptr(), 0) },
        "utimensat",
    );
    secs
}

#[test]
fn chmod_chown_utimens() {
    let m = Mount::new();
    let p = m.p("f");
    fs::write(&p, b"x").unwrap();
    for mode in [0o000, 0o644, 0o755, 0o4755, 0o2755, 0o1777, 0o600] {
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        assert_eq!(
            stat(&p).permissions().mode() & 0o7777,
            mode,
            "mode {mode:o}"
        );
    }
    std::os::unix::fs::chown(&p, Some(1234), Some(5678)).unwrap();
    assert_eq!((stat(&p).uid(), stat(&p).gid()), (1234, 5678));
    std::os::unix::fs::lchown(&p, None, Some(42)).unwrap();
    assert_eq!((stat(&p).uid(), stat(&p).gid()), (1234, 42));
    // Explicit times with nanoseconds, and UTIME_OMIT.
    let ts = [
        libc::timespec {
            tv_sec: 1_500_000_000,
            tv_nsec: 123_456_789,
        },
        libc::timespec {
            tv_sec: 1_600_000_000,
            tv_nsec: 987_654_321,
        },
    ];
    ok(
        unsafe { libc::utimensat(libc::AT_FDCWD, cstr(&p).as_ptr(), ts.as_ptr(), 0) },
        "utimensat",
    );
    let s = stat(&p);
    assert_eq!((s.atime(), s.atime_nsec()), (1_500_000_000, 123_456_789));
    assert_eq!((s.mtime(), s.mtime_nsec()), (1_600_000_000, 987_654_321));
    let ts2 = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: 1_700_000_000,
            tv_nsec: 5,
        },
    ];
    ok(
        unsafe { libc::utimensat(libc::AT_FDCWD, cstr(&p).as_ptr(), ts2.as_ptr(), 0) },
        "utimensat omit",
    );
    let s = stat(&p);
    assert_eq!(
        (s.atime(), s.atime_nsec()),
        (1_500_000_000, 123_456_789),
        "atime kept with UTIME_OMIT"
    );
    assert_eq!((s.mtime(), s.mtime_nsec()), (1_700_000_000, 5));
    // Times before 1970.
    let ts3 = [
        libc::timespec {
            tv_sec: -1000,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: -1000,
            tv_nsec: 0,
        },
    ];
    ok(
        unsafe { libc::utimensat(libc::AT_FDCWD, cstr(&p).as_ptr(), ts3.as_ptr(), 0) },
        "utimensat pre-1970",
    );
    assert_eq!(stat(&p).mtime(), -1000);
    // A write updates mtime and ctime.
    filetime(&p, 1_000_000_000);
    OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .write_all(b"y")
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (stat(&p).mtime() - now).abs() < 60,
        "mtime after a write: {}",
        stat(&p).mtime()
    );
    // chmod updates ctime.
    let c0 = stat(&p).ctime() * 1_000_000_000 + stat(&p).ctime_nsec();
    std::thread::sleep(Duration::from_millis(20));
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
    let c1 = stat(&p).ctime() * 1_000_000_000 + stat(&p).ctime_nsec();
    assert!(c1 > c0, "ctime did not change on chmod");
}

// ---------------------------------------------------------------------------- locks

#[test]
fn flock_exclusive() {
    let m = Mount::new();
    let p = m.p("lock");
    fs::write(&p, b"").unwrap();
    let a = File::open(&p).unwrap();
    let b = File::open(&p).unwrap();
    ok(
        unsafe { libc::flock(a.as_raw_fd(), libc::LOCK_EX) },
        "flock LOCK_EX",
    );
    fails_with(
        unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } as i64,
        libc::EWOULDBLOCK,
        "second LOCK_EX|LOCK_NB",
    );
    fails_with(
        unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } as i64,
        libc::EWOULDBLOCK,
        "LOCK_SH|LOCK_NB while exclusively locked",
    );
    ok(
        unsafe { libc::flock(a.as_raw_fd(), libc::LOCK_UN) },
        "LOCK_UN",
    );
    ok(
        unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        "LOCK_EX after unlock",
    );
    ok(
        unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_UN) },
        "LOCK_UN",
    );
    // Shared locks coexist.
    ok(
        unsafe { libc::flock(a.as_raw_fd(), libc::LOCK_SH) },
        "LOCK_SH a",
    );
    ok(
        unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) },
        "LOCK_SH b",
    );
    // Closing a descriptor releases its lock; a blocked LOCK_EX then proceeds.
    drop(b);
    let c = File::open(&p).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let t = Instant::now();
        let rc = unsafe { libc::flock(c.as_raw_fd(), libc::LOCK_EX) };
        let waited = t.elapsed();
        drop(c);
        let _ = tx.send((rc, waited));
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        rx.try_recv().is_err(),
        "LOCK_EX did not block while another descriptor held LOCK_SH"
    );
    drop(a);
    // On failure the waiter stays blocked in the kernel; the harness then detaches the mount
    // and kills the mount process, which ends the blocked call.
    let (rc, waited) = rx.recv_timeout(Duration::from_secs(10)).expect(
        "a blocked LOCK_EX was not granted within 10 s after the LOCK_SH holders closed their descriptors",
    );
    assert_eq!(rc, 0, "blocked LOCK_EX: {}", errname(errno()));
    assert!(
        waited >= Duration::from_millis(250),
        "LOCK_EX did not block: {waited:?}"
    );
    // Closing the only descriptor of a locked open file description releases its flock.
    // FUSE sends the release of a closed file asynchronously: allow it a moment.
    let e = File::open(&p).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || unsafe {
            libc::flock(e.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB)
        } == 0),
        "LOCK_EX still refused 5 s after the previous holder closed its descriptor: {}",
        errname(errno())
    );
    drop(e);
    let f2 = File::open(&p).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || unsafe {
            libc::flock(f2.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB)
        } == 0),
        "flock still held 5 s after its only descriptor was closed: {}",
        errname(errno())
    );
    ok(
        unsafe { libc::flock(f2.as_raw_fd(), libc::LOCK_UN) },
        "LOCK_UN f2",
    );
    drop(f2);
    // A lock taken from another process conflicts too.
    let d = File::open(&p).unwrap();
    ok(
        unsafe { libc::flock(d.as_raw_fd(), libc::LOCK_EX) },
        "LOCK_EX d",
    );
    let st = Command::new("flock")
        .arg("-n")
        .arg("-E")
        .arg("99")
        .arg(&p)
        .arg("true")
        .status();
    if let Ok(st) = st {
        assert_eq!(
            st.code(),
            Some(99),
            "flock(1) -n from another process should fail to lock"
        );
    }
}

/// fork a child that opens `path` and tries F_SETLK (or F_GETLK with `get`) with `fl`;
/// returns (rc or -errno, the struct flock the child saw).
fn child_fcntl_lock(path: &Path, cmd: i32, fl: libc::flock) -> (i32, libc::flock) {
    let c = cstr(path);
    let mut pipe = [0i32; 2];
    ok(unsafe { libc::pipe(pipe.as_mut_ptr()) }, "pipe");
    // SAFETY: the child only makes async-signal-safe system calls, then _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            let mut fl = fl;
            let fd = libc::open(c.as_ptr(), libc::O_RDWR);
            let rc = if fd < 0 {
                -1000
            } else if libc::fcntl(fd, cmd, &mut fl) < 0 {
                -*libc::__errno_location()
            } else {
                0
            };
            let mut msg = [0u8; 4 + std::mem::size_of::<libc::flock>()];
            msg[..4].copy_from_slice(&rc.to_le_bytes());
            std::ptr::copy_nonoverlapping(
                (&fl as *const libc::flock).cast::<u8>(),
                msg[4..].as_mut_ptr(),
                std::mem::size_of::<libc::flock>(),
            );
            libc::write(pipe[1], msg.as_ptr().cast(), msg.len());
            libc::_exit(0);
        }
    }
    assert!(pid > 0, "fork failed");
    unsafe { libc::close(pipe[1]) };
    let mut msg = [0u8; 4 + std::mem::size_of::<libc::flock>()];
    let n = unsafe { libc::read(pipe[0], msg.as_mut_ptr().cast(), msg.len()) };
    unsafe { libc::close(pipe[0]) };
    let mut status = 0;
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(n as usize, msg.len(), "child reported nothing");
    let rc = i32::from_le_bytes(msg[..4].try_into().unwrap());
    assert_ne!(rc, -1000, "child could not open the file");
    // SAFETY: the bytes are a struct flock written by the child.
    let out: libc::flock = unsafe { std::ptr::read_unaligned(msg[4..].as_ptr().cast()) };
    (rc, out)
}

fn lock_range(kind: i32, start: i64, len: i64) -> libc::flock {
    // SAFETY: all-zero is a valid struct flock.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    fl
}

#[test]
fn fcntl_byte_range_locks() {
    let m = Mount::new();
    let p = m.p("ranges");
    fs::write(&p, vec![0u8; 1000]).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let mut fl = lock_range(libc::F_WRLCK, 0, 100);
    ok(
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &mut fl) },
        "F_SETLK write lock [0,100)",
    );
    // A conflicting range from another process: EAGAIN (or EACCES, both allowed by POSIX).
    let (rc, _) = child_fcntl_lock(&p, libc::F_SETLK, lock_range(libc::F_WRLCK, 50, 100));
    assert!(
        rc == -libc::EAGAIN || rc == -libc::EACCES,
        "conflicting F_SETLK from a child: expected EAGAIN, got {}",
        if rc < 0 {
            errname(-rc)
        } else {
            "success".into()
        }
    );
    let (rc, _) = child_fcntl_lock(&p, libc::F_SETLK, lock_range(libc::F_RDLCK, 99, 1));
    assert!(
        rc == -libc::EAGAIN || rc == -libc::EACCES,
        "read lock on a write-locked byte: {}",
        errname(-rc)
    );
    // A disjoint range works.
    let (rc, _) = child_fcntl_lock(&p, libc::F_SETLK, lock_range(libc::F_WRLCK, 100, 100));
    assert_eq!(rc, 0, "disjoint F_SETLK from a child: {}", errname(-rc));
    // F_GETLK reports the holder.
    let (rc, got) = child_fcntl_lock(&p, libc::F_GETLK, lock_range(libc::F_WRLCK, 10, 5));
    assert_eq!(rc, 0, "F_GETLK: {}", errname(-rc));
    assert_eq!(got.l_type, libc::F_WRLCK as libc::c_short, "F_GETLK type");
    assert_eq!(got.l_pid, std::process::id() as i32, "F_GETLK pid");
    assert_eq!((got.l_start, got.l_len), (0, 100), "F_GETLK range");
    // After unlocking, the child gets it.
    let mut un = lock_range(libc::F_UNLCK, 0, 100);
    ok(
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &mut un) },
        "F_UNLCK",
    );
    let (rc, _) = child_fcntl_lock(&p, libc::F_SETLK, lock_range(libc::F_WRLCK, 50, 100));
    assert_eq!(rc, 0, "F_SETLK after unlock: {}", errname(-rc));
    let (rc, got) = child_fcntl_lock(&p, libc::F_GETLK, lock_range(libc::F_WRLCK, 0, 0));
    assert_eq!(rc, 0);
    assert_eq!(
        got.l_type,
        libc::F_UNLCK as libc::c_short,
        "F_GETLK with no locks held"
    );
    // Shared read locks coexist.
    let mut rd = lock_range(libc::F_RDLCK, 0, 0);
    ok(
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &mut rd) },
        "F_RDLCK whole file",
    );
    let (rc, _) = child_fcntl_lock(&p, libc::F_SETLK, lock_range(libc::F_RDLCK, 0, 10));
    assert_eq!(rc, 0, "read lock beside a read lock: {}", errname(-rc));
    let (rc, _) = child_fcntl_lock(&p, libc::F_SETLK, lock_range(libc::F_WRLCK, 500, 10));
    assert!(
        rc == -libc::EAGAIN || rc == -libc::EACCES,
        "write lock inside a read-locked file: {}",
        errname(-rc)
    );

    // POSIX: closing *any* descriptor of the file releases all of the process's locks on it.
    let other = File::open(&p).unwrap();
    drop(other);
    let (rc, _) = child_fcntl_lock(&p, libc::F_SETLK, lock_range(libc::F_WRLCK, 0, 0));
    assert_eq!(
        rc,
        0,
        "whole-file write lock after the holder closed another fd of the file: {}",
        errname(-rc)
    );

    // Open file description locks (F_OFD_SETLK) belong to the open file, and go away with
    // its last close.
    let g = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let mut ofd = lock_range(libc::F_WRLCK, 0, 10);
    ok(
        unsafe { libc::fcntl(g.as_raw_fd(), libc::F_OFD_SETLK, &mut ofd) },
        "F_OFD_SETLK",
    );
    let h = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let mut ofd2 = lock_range(libc::F_WRLCK, 5, 1);
    fails_with(
        unsafe { libc::fcntl(h.as_raw_fd(), libc::F_OFD_SETLK, &mut ofd2) } as i64,
        libc::EAGAIN,
        "conflicting F_OFD_SETLK from another open file description of the same process",
    );
    drop(g);
    let mut last = 0;
    assert!(
        eventually(Duration::from_secs(5), || {
            last = child_fcntl_lock(&p, libc::F_SETLK, lock_range(libc::F_WRLCK, 0, 10)).0;
            last == 0
        }),
        "an OFD lock was still held 5 s after its open file description was closed: {}",
        errname(-last)
    );
    drop(h);
}

// ---------------------------------------------------------------------------- statfs

#[test]
fn statfs_usage() {
    let m = Mount::new();
    let s = statvfs(m.path());
    assert!(s.f_blocks > 0, "f_blocks is 0");
    assert!(s.f_bsize > 0 && s.f_frsize > 0);
    assert!(s.f_files > 0, "f_files is 0");
    assert!(s.f_namemax >= 255);
    let before = used_bytes(m.path());
    let inodes_before = used_inodes(m.path());
    {
        let mut f = File::create(m.p("ten")).unwrap();
        f.write_all(&pattern(1, (10 * MIB) as usize)).unwrap();
        f.sync_all().unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || used_bytes(m.path())
            >= before + 10 * MIB),
        "used space grew from {before} to {} after writing 10 MiB",
        used_bytes(m.path())
    );
    assert_eq!(
        used_inodes(m.path()),
        inodes_before + 1,
        "used inodes after one create"
    );
    let after = used_bytes(m.path());
    fs::remove_file(m.p("ten")).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || used_bytes(m.path())
            <= after - 10 * MIB),
        "used space did not shrink after unlink: {} -> {}",
        after,
        used_bytes(m.path())
    );
    // df agrees it is a file system with a size.
    let out = Command::new("df").arg("-k").arg(m.path()).output().unwrap();
    assert!(
        out.status.success(),
        "df: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn statfs_capacity_limit() {
    let m = Mount::with(
        MountConfig::default()
            .format_arg("--capacity")
            .format_arg("1"),
    );
    let s = statvfs(m.path());
    assert_eq!(
        s.f_blocks * s.f_frsize,
        1 << 30,
        "total size with --capacity 1"
    );
    assert!(s.f_bavail * s.f_frsize <= 1 << 30);
    // Allocating more than the capacity fails with ENOSPC.
    let f = File::create(m.p("huge")).unwrap();
    fails_with(
        unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 2 << 30) } as i64,
        libc::ENOSPC,
        "fallocate 2 GiB on a 1 GiB volume",
    );
    // Writing within it works.
    f.write_all_at(&pattern(2, MIB as usize), 0).unwrap();
    f.sync_all().unwrap();
}

// ---------------------------------------------------------------------------- mmap

#[test]
fn mmap_shared_write() {
    let m = Mount::new();
    let p = m.p("mapped");
    let len = 3 * MIB as usize + 4096;
    let data = pattern(21, len);
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .unwrap();
        f.set_len(len as u64).unwrap();
        let ptr = map(
            &f,
            0,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        );
        // SAFETY: a fresh shared mapping of `len` bytes of an open file, used only here.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.cast::<u8>(), len);
            ok(libc::msync(ptr, len, libc::MS_SYNC), "msync");
            ok(libc::munmap(ptr, len), "munmap");
        }
        // read() on the same descriptor sees the mapped writes.
        assert_same(&pread(&f, 0, len), &data, "read() after msync");
    }
    assert_same(&read_all(&p), &data, "read() after close");
    // Partial update through a second mapping at an offset.
    {
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let off = MIB as usize;
        let ptr = map(
            &f,
            off as i64,
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        );
        // SAFETY: the 4096 bytes mapped just above, unmapped here.
        unsafe {
            std::ptr::write_bytes(ptr.cast::<u8>(), 0xAB, 4096);
            ok(libc::msync(ptr, 4096, libc::MS_SYNC), "msync");
            ok(libc::munmap(ptr, 4096), "munmap");
        }
    }
    let mut want = data;
    want[MIB as usize..MIB as usize + 4096].fill(0xAB);
    assert_same(&read_all(&p), &want, "after the second mapping");
}

#[test]
fn mmap_read() {
    let m = Mount::new();
    let p = m.p("ro-mapped");
    let len = 5 * MIB as usize + 123;
    let data = pattern(22, len);
    fs::write(&p, &data).unwrap();
    let f = File::open(&p).unwrap();
    let ptr = map(&f, 0, len, libc::PROT_READ, libc::MAP_PRIVATE);
    // SAFETY: a private read-only mapping of the file, read within its length.
    unsafe {
        let got = std::slice::from_raw_parts(ptr.cast::<u8>(), len);
        assert_same(got, &data, "mmap read");
        ok(libc::munmap(ptr, len), "munmap");
    }
}

// ---------------------------------------------------------------------------- unlink

#[test]
fn unlink_while_open() {
    let m = Mount::new();
    let p = m.p("doomed");
    let data = pattern(31, (2 * MIB + 77) as usize);
    fs::write(&p, &data).unwrap();
    let inodes = used_inodes(m.path());
    let mut f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    fs::remove_file(&p).unwrap();
    io_err(fs::metadata(&p), libc::ENOENT, "stat after unlink");
    io_err(File::open(&p), libc::ENOENT, "open after unlink");
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    assert_same(
        &pread(&f, 0, data.len()),
        &data,
        "read through the open fd after unlink",
    );
    // Writing through it still works.
    f.seek(SeekFrom::End(0)).unwrap();
    f.write_all(b"appended").unwrap();
    f.sync_all().unwrap();
    assert_eq!(pread(&f, data.len() as u64, 100), b"appended");
    assert!(
        fs::read_dir(m.path()).unwrap().next().is_none(),
        "the name is still listed"
    );
    // The name can be reused at once, as a different file.
    fs::write(&p, b"new").unwrap();
    assert_eq!(read_all(&p), b"new");
    assert_same(
        &pread(&f, 0, 10),
        &data[..10],
        "old data after reuse of the name",
    );
    drop(f);
    assert!(
        eventually(Duration::from_secs(10), || used_inodes(m.path()) == inodes),
        "unlinked inode not freed after close: {} used, want {inodes}",
        used_inodes(m.path())
    );
}

// ---------------------------------------------------------------------------- durability

#[test]
fn persistence_across_remount() {
    let mut m = Mount::new();
    let big = pattern(41, (9 * MIB + 5) as usize);
    fs::DirBuilder::new()
        .mode(0o750)
        .create(m.p("dir"))
        .unwrap();
    fs::set_permissions(m.p("dir"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::write(m.p("dir/small"), b"small file").unwrap();
    fs::set_permissions(m.p("dir/small"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(m.p("dir/small"), Some(1000), Some(1001)).unwrap();
    fs::write(m.p("big"), &big).unwrap();
    File::create(m.p("empty")).unwrap();
    {
        let f = File::create(m.p("sparse")).unwrap();
        f.write_all_at(b"far", 70 * MIB).unwrap();
    }
    assert_eq!(setxattr(&m.p("dir/small"), "user.k", b"v1", 0), 0);
    assert_eq!(setxattr(&m.p("dir"), "user.dirattr", &[1, 2, 3], 0), 0);
    std::os::unix::fs::symlink("dir/small", m.p("rel-link")).unwrap();
    std::os::unix::fs::symlink(m.p("big"), m.p("abs-link")).unwrap();
    fs::hard_link(m.p("dir/small"), m.p("hard")).unwrap();
    filetime(&m.p("big"), 1_234_567_890);
    let c = cstr(m.p("fifo"));
    ok(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, "mkfifo");
    // Unflushed data in a file still open at unmount time is not expected to survive unless
    // closed; close everything first (a clean unmount needs that anyway).
    let before: Vec<(String, u64, u32, u64)> = walk(m.path());

    m.remount();

    let after = walk(m.path());
    assert_eq!(
        before, after,
        "tree (path, size, mode, inode) changed across remount"
    );
    assert_eq!(read_all(&m.p("dir/small")), b"small file");
    let st = stat(&m.p("dir/small"));
    assert_eq!(st.permissions().mode() & 0o7777, 0o640);
    assert_eq!((st.uid(), st.gid()), (1000, 1001));
    assert_eq!(st.nlink(), 2);
    assert_eq!(stat(&m.p("dir")).permissions().mode() & 0o7777, 0o750);
    assert_same(&read_all(&m.p("big")), &big, "big file after remount");
    assert_eq!(stat(&m.p("big")).mtime(), 1_234_567_890);
    assert_eq!(stat(&m.p("empty")).len(), 0);
    let sp = File::open(m.p("sparse")).unwrap();
    assert_eq!(sp.metadata().unwrap().len(), 70 * MIB + 3);
    assert_eq!(pread(&sp, 70 * MIB, 3), b"far");
    assert_zeros(&pread(&sp, 0, MIB as usize), "sparse hole after remount");
    assert_eq!(getxattr(&m.p("dir/small"), "user.k"), Ok(b"v1".to_vec()));
    assert_eq!(getxattr(&m.p("dir"), "user.dirattr"), Ok(vec![1, 2, 3]));
    assert_eq!(
        fs::read_link(m.p("rel-link")).unwrap(),
        Path::new("dir/small")
    );
    assert_eq!(fs::read_link(m.p("abs-link")).unwrap(), m.p("big"));
    assert_eq!(read_all(&m.p("rel-link")), b"small file");
    assert!(stat(&m.p("fifo")).file_type().is_fifo());
    assert_eq!(stat(&m.p("hard")).ino(), st.ino());
}

/// (relative path, size, mode, inode) of everything under `root`, sorted.
fn walk(root: &Path) -> Vec<(String, u64, u32, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let st = fs::symlink_metadata(e.path()).unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            out.push((
                rel,
                if st.is_dir() { 0 } else { st.len() },
                st.mode(),
                st.ino(),
            ));
            if st.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Bytes of the files under `root` that are in the page cache.
fn resident_bytes(root: &Path) -> u64 {
    walk(root)
        .into_iter()
        .filter(|(_, size, mode, _)| *size > 0 && mode & libc::S_IFMT == libc::S_IFREG)
        .map(|(rel, ..)| {
            let pages = strata::directio::resident_pages(&root.join(rel));
            pages.iter().filter(|r| **r).count() as u64 * 4096
        })
        .sum()
}

#[test]
fn a_reader_along_a_file_leaves_the_local_stores_files_out_of_the_page_cache() {
    // The mount's page cache keeps what was read: the object files' pages are dropped
    // behind the reader, not cached a second time. With the default disk cache (blocks
    // fetched into memory, dropped from the store's files at once) and without one (the
    // files mapped, dropped 16 blocks behind the reader).
    read_along_and_check_the_stores_page_cache(MountConfig::default());
    read_along_and_check_the_stores_page_cache(MountConfig::default().mount_arg("--cache-size=0"));
}

fn read_along_and_check_the_stores_page_cache(cfg: MountConfig) {
    let mut m = Mount::with(cfg);
    let len = 160 * MIB as usize; // 40 blocks of 4 MiB
    let data = pattern(77, len);
    {
        let mut f = File::create(m.p("along")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    m.remount(); // an empty page cache for the mount
    let f = File::open(m.p("along")).unwrap();
    for (i, want) in data.chunks(MIB as usize).enumerate() {
        assert_same(
            &pread(&f, i as u64 * MIB, MIB as usize),
            want,
            "a MiB of the file",
        );
    }
    let store = m.dir().join("data");
    let mut resident = 0;
    let dropped = eventually(Duration::from_secs(10), || {
        resident = resident_bytes(&store);
        resident <= 100 * MIB
    });
    assert!(
        dropped,
        "{} MiB of the store's files still cached after reading {} MiB; log:\n{}",
        resident / MIB,
        len as u64 / MIB,
        m.log_tail(20)
    );
}

#[test]
fn kill9_keeps_fsynced_data() {
    let mut m = Mount::new();
    let len = 64 * MIB as usize;
    let data = pattern(51, len);
    let want_sum = crc32c::crc32c(&data);
    fs::create_dir(m.p("newdir")).unwrap();
    let p = m.p("newdir/durable");
    let f = File::create(&p).unwrap();
    for (i, c) in data.chunks(MIB as usize).enumerate() {
        f.write_all_at(c, (i as u64) * MIB).unwrap();
    }
    f.sync_all().unwrap();
    // A small file, fsynced, and an overwrite of part of the big one, fsynced.
    let small = m.p("newdir/small");
    let g = File::create(&small).unwrap();
    g.write_all_at(b"small and synced", 0).unwrap();
    g.sync_all().unwrap();
    // Closed without fsync: close stores the data (close-to-open), so it survives too.
    fs::write(m.p("newdir/closed"), pattern(52, 300_000)).unwrap();
    // Namespace operations are committed when they return.
    fs::write(m.p("renamed-from"), b"renamed").unwrap();
    fs::rename(m.p("renamed-from"), m.p("newdir/renamed-to")).unwrap();
    // Written after the last fsync: may or may not survive, not checked.
    f.write_all_at(b"unsynced", len as u64).unwrap();

    m.kill9();
    // The descriptors belong to the dead mount; closing them must not hang.
    drop(f);
    drop(g);
    m.mount();

    let got = read_all(&p);
    assert!(
        got.len() >= len,
        "size after kill -9: {} < {len}",
        got.len()
    );
    let sum = crc32c::crc32c(&got[..len]);
    if sum != want_sum {
        assert_same(&got[..len], &data, "fsynced data after kill -9");
    }
    assert_eq!(read_all(&small), b"small and synced");
    assert_same(
        &read_all(&m.p("newdir/closed")),
        &pattern(52, 300_000),
        "closed file after kill -9",
    );
    assert_eq!(read_all(&m.p("newdir/renamed-to")), b"renamed");
    io_err(
        fs::metadata(m.p("renamed-from")),
        libc::ENOENT,
        "old name after kill -9",
    );
    // The volume is usable after the crash.
    fs::write(m.p("after"), b"ok").unwrap();
    assert_eq!(read_all(&m.p("after")), b"ok");
}

// ---------------------------------------------------------------------------- truncate cost

/// Median wall time of `op`, run `n` times with `between` (not timed) before each run.
fn median_time(n: usize, mut between: impl FnMut(), mut op: impl FnMut()) -> Duration {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        between();
        let t = Instant::now();
        op();
        times.push(t.elapsed());
    }
    times.sort();
    times[n / 2]
}

/// Write `n` small pieces at scattered offsets of chunk 0, each followed by fsync (one slice
/// each); returns the file length.
fn write_slices(p: &Path, n: usize) -> u64 {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap();
    let span = 8192u64 * 4000; // 31 MiB: all in chunk 0
    let mut rng = Rng::new(n as u64);
    for i in 0..n {
        let off = rng.below(span / 512) * 512;
        f.write_all_at(format!("slice {i:05}|").as_bytes(), off)
            .unwrap();
        f.sync_data().unwrap();
    }
    f.metadata().unwrap().len()
}

#[test]
fn truncate_cost_independent_of_slices() {
    // No background compaction: the slice counts must stay as written.
    let m = Mount::with(MountConfig::default().mount_arg("--no-bgjob"));
    let t = Instant::now();
    let many = m.p("many-slices");
    let few = m.p("few-slices");
    let many_len = write_slices(&many, 2000);
    let few_len = write_slices(&few, 20);
    eprintln!("wrote 2020 fsynced slices in {:?}", t.elapsed());
    let many_info = m.info(&many);
    let few_info = m.info(&few);
    let many_slices = many_info["slices"].as_u64().unwrap();
    let few_slices = few_info["slices"].as_u64().unwrap();
    assert!(many_slices >= 2000, "expected >= 2000 slices: {many_info}");
    assert!(
        (20..=40).contains(&few_slices),
        "expected ~20 slices: {few_info}"
    );

    let measure = |p: &Path, len: u64| -> (Duration, Duration) {
        let f = OpenOptions::new().write(true).open(p).unwrap();
        let ftrunc = median_time(5, || f.set_len(len).unwrap(), || f.set_len(0).unwrap());
        let otrunc = median_time(
            5,
            || f.set_len(len).unwrap(),
            || {
                OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(p)
                    .unwrap();
            },
        );
        (ftrunc, otrunc)
    };
    let (many_ft, many_ot) = measure(&many, many_len);
    let (few_ft, few_ot) = measure(&few, few_len);
    eprintln!(
        "ftruncate(0): {many_slices} slices {many_ft:?}, {few_slices} slices {few_ft:?}; \
         open(O_TRUNC): {many_ot:?} vs {few_ot:?}"
    );
    let limit = |few: Duration| few * 3 + Duration::from_millis(5);
    assert!(
        many_ft <= limit(few_ft),
        "ftruncate(0) of a {many_slices}-slice file took {many_ft:?}, > 3x the {few_slices}-slice file ({few_ft:?}) + 5 ms"
    );
    assert!(
        many_ot <= limit(few_ot),
        "open(O_TRUNC) of a {many_slices}-slice file took {many_ot:?}, > 3x the {few_slices}-slice file ({few_ot:?}) + 5 ms"
    );
    // The truncated file reads as zeros where the slices were.
    assert_eq!(stat(&many).len(), 0);
    OpenOptions::new()
        .write(true)
        .open(&many)
        .unwrap()
        .set_len(many_len)
        .unwrap();
    assert_zeros(
        &read_all(&many),
        "2000-slice file after truncate(0) and regrow",
    );
    eprintln!("after the truncations: {}", m.info(&many));
}

// ---------------------------------------------------------------------------- kernel readahead

/// The mount's `read_ahead_kb` (its backing device in sysfs), waiting up to 10 s for it to
/// become `want` (the client sets it from a thread once the mount answers).
fn wait_read_ahead_kb(path: &Path, want: u64) -> u64 {
    let file = strata::fuse::read_ahead_kb_file(path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got: u64 = fs::read_to_string(&file).unwrap().trim().parse().unwrap();
        if got == want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_kernel_reads_ahead_what_the_mount_asks() {
    // Default: 4 MiB, not the kernel's 128 KiB (which made each 1 MiB read of a sequential
    // reader wait for its own round trip).
    let m = Mount::new();
    assert_eq!(wait_read_ahead_kb(m.path(), 4096), 4096);
    let data: Vec<u8> = (0..9 * MIB).map(|i| (i % 251) as u8).collect();
    fs::write(m.p("f"), &data).unwrap();
    assert_eq!(fs::read(m.p("f")).unwrap(), data);
    drop(m);
    let m = Mount::with(MountConfig::default().mount_arg("--kernel-readahead=16"));
    assert_eq!(wait_read_ahead_kb(m.path(), 16384), 16384);
    drop(m);
    // 0 leaves the kernel's own window alone.
    let m = Mount::with(MountConfig::default().mount_arg("--kernel-readahead=0"));
    std::thread::sleep(Duration::from_millis(500));
    assert_ne!(wait_read_ahead_kb(m.path(), 4096), 4096);
}
