//! `strata dump` / `strata load`: a volume's metadata moved from SQLite to PostgreSQL (and to
//! another SQLite file) through the CLI, taken while a writer keeps writing; the copy mounts
//! over the same objects with the same tree (names, kinds, sizes, modes, times, contents,
//! symlinks, hard links, xattrs, quotas, truncated and sparse files) and fsck is clean. Bad
//! targets and cut dumps are refused without leaving a half volume.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use strata::testing::mount::{self, TestMount};
use strata::testing::postgres::PgServer;

const BIN: &str = env!("CARGO_BIN_EXE_strata");

fn strata(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = strata(args);
    assert!(
        out.status.success(),
        "strata {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed ^ (i >> 10) as u8)
        .collect()
}

/// Everything a user can see of a tree: path → description.
fn describe(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let md = fs::symlink_metadata(&p).unwrap();
            let mut xattrs: Vec<String> = xattr_names(&p);
            xattrs.sort();
            let what = if md.file_type().is_symlink() {
                format!("link -> {}", fs::read_link(&p).unwrap().display())
            } else if md.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else {
                let mut data = Vec::new();
                fs::File::open(&p).unwrap().read_to_end(&mut data).unwrap();
                format!("file crc {:08x}", crc32c::crc32c(&data))
            };
            out.insert(
                rel,
                format!(
                    "{what} size {} mode {:o} uid {} nlink {} mtime {}.{} xattrs {xattrs:?}",
                    md.len(),
                    md.mode(),
                    md.uid(),
                    md.nlink(),
                    md.mtime(),
                    md.mtime_nsec(),
                ),
            );
        }
    }
    out
}

fn xattr_names(p: &Path) -> Vec<String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: a valid path and a buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return Vec::new();
    }
    buf[..n as usize]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).to_string())
        .collect()
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid strings and a buffer of the given length.
    let r = unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
}

/// `strata load URL` fed through a pipe, as `strata dump A | strata load B` would.
fn load_from_stdin(url: &str, dump: &[u8]) {
    let mut child = Command::new(BIN)
        .args(["load", url])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(dump).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_volume_moves_from_sqlite_to_postgresql_and_back_through_dump_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let src = format!("sqlite://{}/meta.db", dir.path().display());
    let data = dir.path().join("data");
    mount::format(BIN, &["--bucket", data.to_str().unwrap(), &src, "movevol"]);
    let mut m = TestMount::new(BIN, &src, &dir.path().join("mnt"), &["--cache-size", "0"]);
    let root = m.path.clone();
    fs::create_dir_all(root.join("team/a/deep")).unwrap();
    fs::write(root.join("team/a/big.bin"), pattern(1, 9 << 20)).unwrap();
    fs::write(root.join("team/a/deep/small.txt"), b"hello").unwrap();
    fs::set_permissions(
        root.join("team/a/deep/small.txt"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    // Truncated (masks), sparse, rewritten in the middle (several slices).
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(root.join("team/ckpt.pt"))
        .unwrap();
    f.write_all(&pattern(2, 6 << 20)).unwrap();
    f.sync_all().unwrap();
    f.set_len(1 << 20).unwrap();
    f.seek(SeekFrom::Start(3 << 20)).unwrap();
    f.write_all(b"tail").unwrap();
    f.seek(SeekFrom::Start(4096)).unwrap();
    f.write_all(&pattern(3, 8192)).unwrap();
    drop(f);
    std::os::unix::fs::symlink("a/big.bin", root.join("team/link")).unwrap();
    fs::hard_link(
        root.join("team/a/deep/small.txt"),
        root.join("team/hard.txt"),
    )
    .unwrap();
    set_xattr(
        &root.join("team/a/big.bin"),
        "user.origin",
        b"\x00binary\xff",
    );
    fs::write(root.join("unicode-é-名前.txt"), b"x").unwrap();
    ok(&["quota", "set", &src, "--path", "/team", "--capacity", "1G"]);
    // A writer keeps writing while the dump is taken: the dump is a snapshot.
    let writer_dir = root.join("busy");
    fs::create_dir(&writer_dir).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, d) = (stop.clone(), writer_dir.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                fs::write(d.join(format!("f{i}")), pattern(i as u8, 100_000)).unwrap();
                i += 1;
            }
            i
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let dump = dir.path().join("vol.dump");
    let out = strata(&["dump", &src, "-o", dump.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("dumped"));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written > 0);
    m.unmount();

    // Into PostgreSQL (a throwaway server), via standard input as a pipe would.
    let pg = PgServer::start().unwrap_or_else(|e| panic!("{e}"));
    let dst = pg.new_database();
    load_from_stdin(&dst, &fs::read(&dump).unwrap());
    let report = ok(&["fsck", &dst]);
    assert!(report.contains("0 problems"), "{report}");
    assert!(ok(&["quota", "get", &dst, "--path", "/team"]).contains("1073741824"));

    // The copy mounts over the same objects: every file the dump saw is there, the same.
    let mut copy = TestMount::new(BIN, &dst, &dir.path().join("copy"), &["--cache-size", "0"]);
    let mut orig = TestMount::new(BIN, &src, &dir.path().join("mnt"), &["--cache-size", "0"]);
    let (a, b) = (
        describe(&orig.path.join("team")),
        describe(&copy.path.join("team")),
    );
    assert_eq!(a.len(), 7, "{a:#?}");
    assert_eq!(a, b);
    assert_eq!(
        fs::read(copy.path.join("unicode-é-名前.txt")).unwrap(),
        b"x"
    );
    let busy = fs::read_dir(copy.path.join("busy")).unwrap().count();
    assert!(
        busy <= written,
        "the dump is a snapshot: {busy} of {written}"
    );
    for e in fs::read_dir(copy.path.join("busy")).unwrap() {
        let e = e.unwrap();
        let n: usize = e.file_name().to_string_lossy()[1..].parse().unwrap();
        let got = fs::read(e.path()).unwrap();
        // A file the snapshot caught being created may be empty; never wrong bytes.
        assert!(
            got.is_empty() || got == pattern(n as u8, 100_000),
            "{}",
            e.path().display()
        );
    }
    // Writes go on in the copy.
    fs::write(copy.path.join("team/after-move.txt"), b"new").unwrap();
    copy.unmount();
    orig.unmount();

    // A dump of the copy loads into a new SQLite file just the same.
    let dump2 = ok(&["dump", &dst]);
    let back = format!("sqlite://{}/back.db", dir.path().display());
    load_from_stdin(&back, dump2.as_bytes());
    let back_m = TestMount::new(BIN, &back, &dir.path().join("back"), &["--cache-size", "0"]);
    assert_eq!(
        fs::read(back_m.path.join("team/after-move.txt")).unwrap(),
        b"new"
    );
    drop(back_m);

    // Refused: a target that holds a volume; a dump cut short (and nothing left behind).
    let out = strata(&["load", &back, dump.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a volume"));
    let text = fs::read_to_string(&dump).unwrap();
    let cut = dir.path().join("cut.dump");
    fs::write(&cut, &text[..text.len() / 2]).unwrap();
    let partial = format!("sqlite://{}/partial.db", dir.path().display());
    let out = strata(&["load", &partial, cut.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cut short") || err.contains("not JSON"),
        "{err}"
    );
    let out = strata(&["status", &partial]);
    assert!(
        !out.status.success(),
        "a cut load must not look like a volume"
    );
}

/// The metadata moves with a pause of one catch-up: dump + load while a writer works, catch
/// up (writer still working), stop the writer, catch up once more; the copy then equals
/// the original file for file, and fsck is clean.
#[test]
fn a_copy_catches_up_with_what_changed_since_the_dump() {
    let dir = tempfile::tempdir().unwrap();
    let src = format!("sqlite://{}/src.db", dir.path().display());
    let dst = format!("sqlite://{}/dst.db", dir.path().display());
    let objs = dir.path().join("objects");
    mount::format(
        BIN,
        &[
            "--storage",
            "file",
            "--bucket",
            objs.to_str().unwrap(),
            "--trash-days",
            "1",
            &src,
            "catchvol",
        ],
    );
    let mut m = TestMount::new(BIN, &src, &dir.path().join("mnt"), &[]);
    for d in 0..5 {
        fs::create_dir_all(m.path.join(format!("d{d}/sub"))).unwrap();
        for f in 0..20 {
            fs::write(
                m.path.join(format!("d{d}/f{f}")),
                pattern(f as u8, 3000 + f),
            )
            .unwrap();
        }
    }
    fs::write(m.path.join("d0/sub/deep"), b"deep").unwrap();
    // Dump while the mount is live; the token comes with it.
    let out = Command::new(BIN)
        .args(["dump", &src, "-o"])
        .arg(dir.path().join("d.dump"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let token = err
        .split("change token: ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or_else(|| panic!("no token in: {err}"))
        .to_string();
    ok(&["load", &dst, dir.path().join("d.dump").to_str().unwrap()]);
    // Changes after the dump: new, changed, renamed, deleted (trashed), a hard link, xattrs.
    fs::write(m.path.join("d1/new"), pattern(9, 70_000)).unwrap();
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(m.path.join("d2/f3"))
            .unwrap();
        f.seek(SeekFrom::Start(100)).unwrap();
        f.write_all(b"changed").unwrap();
    }
    fs::rename(m.path.join("d3/f1"), m.path.join("d4/moved")).unwrap();
    fs::remove_file(m.path.join("d3/f2")).unwrap();
    fs::hard_link(m.path.join("d4/f5"), m.path.join("d0/link")).unwrap();
    set_xattr(&m.path.join("d0/f0"), "user.tag", b"v1");
    fs::remove_file(m.path.join("d0/sub/deep")).unwrap();
    fs::remove_dir(m.path.join("d0/sub")).unwrap();
    let first = ok(&["load", &dst, "--from", &src, "--since", &token]);
    let next = first
        .split("next token: ")
        .nth(1)
        .unwrap()
        .trim()
        .to_string();
    // More changes, then the writers stop (unmount) and the last catch-up runs.
    fs::write(m.path.join("d1/later"), b"later").unwrap();
    fs::remove_file(m.path.join("d1/new")).unwrap();
    m.unmount();
    let last = ok(&["load", &dst, "--from", &src, "--since", &next]);
    assert!(last.contains("caught up"), "{last}");
    let fsck = ok(&["fsck", &dst]);
    assert!(fsck.contains(" 0 problems"), "{fsck}");
    // The two volumes show the same tree.
    m.remount();
    let want = describe(&m.path);
    m.unmount();
    let copy = TestMount::new(BIN, &dst, &dir.path().join("mnt2"), &[]);
    let got = describe(&copy.path);
    for (k, v) in &want {
        assert_eq!(got.get(k), Some(v), "{k} differs");
    }
    assert_eq!(
        got.len(),
        want.len(),
        "{:?}",
        got.keys().collect::<Vec<_>>()
    );
    // A token of another database is refused.
    let bad = strata(&[
        "load",
        &dst,
        "--from",
        &src,
        "--since",
        "0123456789abcdef.1",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("another metadata database"));
}
