//! `strata sync` between local directories, Strata volumes (SQLite + local objects) and S3
//! (SeaweedFS; skipped only with STRATA_SKIP_S3=1): trees compared entry by entry (kind,
//! size, bytes, mode, owner, mtime, xattrs, symlink targets, hard-link groups), incremental
//! passes counted, --delete, filters, a run killed mid-copy and resumed through the real
//! binary, and a `--since` pass that lists only the changed directories.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata::metrics::Metrics;
use strata::object::StorageConfig;
use strata::sync::endpoint::{Endpoint, Kind};
use strata::sync::local::LocalDir;
use strata::sync::s3::{S3Access, S3Dir};
use strata::sync::volume::VolumeDir;
use strata::sync::{self, Filter, Summary, SyncOptions};
use strata::testing::seaweedfs::SeaweedFs;
use strata::volume::{self, FormatOptions};

const BIN: &str = env!("CARGO_BIN_EXE_strata");

/// One entry of a tree as compared.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    kind: Kind,
    size: u64,
    crc: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    atime: Option<i64>,
    target: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The first path (in name order) of the same inode, for hard links.
    link_of: Option<String>,
}

/// Everything below the root of `ep`; `attrs`: modes, owners, times and xattrs too.
fn snapshot(ep: &dyn Endpoint, attrs: bool, atime: bool) -> BTreeMap<String, Seen> {
    let mut out = BTreeMap::new();
    let mut ids: HashMap<u64, String> = HashMap::new();
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        let items = ep.list(&dir).unwrap().unwrap_or_default();
        for it in items {
            let path = if dir.is_empty() {
                it.name.clone()
            } else {
                format!("{dir}/{}", it.name)
            };
            let mut crc = 0;
            let mut target = Vec::new();
            match it.kind {
                Kind::File => {
                    let mut r = ep.open(&path, &it).unwrap();
                    while let Some(b) = r.next().unwrap() {
                        crc = crc32c::crc32c_append(crc, &b);
                    }
                }
                Kind::Dir => stack.push(path.clone()),
                Kind::Symlink => target = ep.readlink(&path).unwrap(),
                Kind::Other => {}
            }
            let link_of = (it.kind == Kind::File && it.nlink > 1 && it.id != 0)
                .then(|| ids.entry(it.id).or_insert_with(|| path.clone()).clone());
            let mut s = Seen {
                kind: it.kind,
                size: if it.kind == Kind::Dir { 0 } else { it.size },
                crc,
                mode: 0,
                uid: 0,
                gid: 0,
                mtime: 0,
                atime: None,
                target,
                xattrs: Vec::new(),
                link_of,
            };
            if attrs {
                s.mode = it.mode;
                s.uid = it.uid;
                s.gid = it.gid;
                s.mtime = it.mtime;
                s.atime = atime.then_some(it.atime);
                if it.kind != Kind::Symlink {
                    s.xattrs = ep.xattrs(&path, Some(&it)).unwrap();
                }
            }
            out.insert(path, s);
        }
    }
    // Hard-link groups by their first path in name order, whatever order the walk took.
    let mut first: HashMap<String, String> = HashMap::new();
    for (p, s) in &out {
        if let Some(l) = &s.link_of {
            first.entry(l.clone()).or_insert_with(|| p.clone());
        }
    }
    for s in out.values_mut() {
        if let Some(l) = &s.link_of {
            s.link_of = first.get(l).cloned();
        }
    }
    out
}

fn assert_same(a: &BTreeMap<String, Seen>, b: &BTreeMap<String, Seen>) {
    let names = |m: &BTreeMap<String, Seen>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(a), names(b), "the same entries");
    for (p, s) in a {
        assert_eq!(Some(s), b.get(p), "{p}");
    }
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn set_times(p: &Path, atime_ns: i64, mtime_ns: i64) {
    let ts = |ns: i64| libc::timespec {
        tv_sec: ns / 1_000_000_000,
        tv_nsec: ns % 1_000_000_000,
    };
    let t = [ts(atime_ns), ts(mtime_ns)];
    // SAFETY: valid path and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c(p).as_ptr(),
            t.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid strings and buffer.
    let r = unsafe {
        libc::lsetxattr(
            c(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn chown(p: &Path, uid: u32, gid: u32) {
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::lchown(c(p).as_ptr(), uid, gid) }, 0);
}

fn write(p: &Path, data: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// A tree with every kind of thing a POSIX tree keeps.
fn rich_tree(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    write(&root.join("a.txt"), b"hello");
    write(&root.join("empty"), b"");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    write(&root.join("dir/big.bin"), &big);
    write(&root.join("dir/sub/deep.txt"), b"deep");
    std::fs::create_dir_all(root.join("dir/emptydir")).unwrap();
    std::os::unix::fs::symlink("../a.txt", root.join("dir/link")).unwrap();
    std::os::unix::fs::symlink("/nowhere/dangling", root.join("dangling")).unwrap();
    std::fs::hard_link(root.join("a.txt"), root.join("dir/hard")).unwrap();
    std::fs::hard_link(root.join("a.txt"), root.join("dir/sub/hard2")).unwrap();
    std::fs::set_permissions(
        root.join("dir/sub/deep.txt"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::fs::set_permissions(root.join("dir/sub"), std::fs::Permissions::from_mode(0o711)).unwrap();
    chown(&root.join("dir/sub/deep.txt"), 1234, 5678);
    chown(&root.join("dir/link"), 4321, 8765);
    set_xattr(&root.join("dir/big.bin"), "user.tag", b"blue");
    set_xattr(&root.join("dir"), "user.dirtag", b"d");
    for (i, p) in [
        "a.txt",
        "empty",
        "dir/big.bin",
        "dir/sub/deep.txt",
        "dir/link",
        "dangling",
    ]
    .iter()
    .enumerate()
    {
        set_times(
            &root.join(p),
            1_600_000_000_123_456_789 + i as i64,
            1_500_000_000_987_654_321 + i as i64,
        );
    }
    for (i, p) in ["dir/sub", "dir/emptydir", "dir"].iter().enumerate() {
        set_times(
            &root.join(p),
            1_600_000_100_000_000_000,
            1_500_000_100_000_000_007 + i as i64,
        );
    }
}

fn new_volume(dir: &Path, name: &str) -> String {
    let url = format!("sqlite://{}/{name}.db", dir.display());
    let opts = FormatOptions {
        name: name.to_string(),
        storage: StorageConfig {
            storage: "file".into(),
            bucket: dir.join(format!("{name}-objects")).display().to_string(),
            access_key: None,
            secret_key: None,
            region: None,
        },
        block_size_kib: 1024,
        capacity_gib: 0,
        inodes: 0,
    };
    volume::format(&url, &opts, Arc::new(Metrics::new())).unwrap();
    url
}

fn vol(url: &str, path: &str, read_only: bool) -> VolumeDir {
    VolumeDir::open(url, path, read_only, Arc::new(Metrics::new())).unwrap()
}

fn opts(state: &Path) -> SyncOptions {
    SyncOptions {
        threads: 4,
        quiet: true,
        state_dir: Some(state.to_path_buf()),
        ..SyncOptions::default()
    }
}

fn go(src: &dyn Endpoint, dst: &dyn Endpoint, o: &SyncOptions, f: &Filter) -> Summary {
    let s = sync::run(src, dst, f, o).unwrap();
    assert_eq!(s.failed, 0, "{s}");
    s
}

#[test]
fn local_to_local_full_incremental_delete() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, state) = (
        t.path().join("src"),
        t.path().join("dst"),
        t.path().join("state"),
    );
    rich_tree(&src);
    let o = opts(&state);
    let none = Filter::default();
    let first = go(&LocalDir::new(&src), &LocalDir::new(&dst), &o, &none);
    assert_eq!(
        first.copied, 6,
        "4 files (one name of the 3 hard links) and 2 symlinks: {first}"
    );
    assert_eq!(first.linked, 2, "{first}");
    assert_same(
        &snapshot(&LocalDir::new(&src), true, false),
        &snapshot(&LocalDir::new(&dst), true, false),
    );

    // Nothing changed: nothing copied.
    let again = go(&LocalDir::new(&src), &LocalDir::new(&dst), &o, &none);
    assert_eq!(
        (again.copied, again.linked, again.attrs_updated),
        (0, 0, 0),
        "{again}"
    );
    assert_eq!(again.skipped, 8, "{again}");

    // One file's bytes, one file's mode, one new file; an extra file at DST stays without
    // --delete and goes with it.
    write(&src.join("dir/sub/deep.txt"), b"deeper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(src.join("empty"), std::fs::Permissions::from_mode(0o600)).unwrap();
    write(&src.join("dir/new.txt"), b"new");
    write(&dst.join("dir/extra.txt"), b"only at dst");
    std::fs::create_dir_all(dst.join("olddir/x")).unwrap();
    let inc = go(&LocalDir::new(&src), &LocalDir::new(&dst), &o, &none);
    // Attributes: the mode of `empty`, and the time of DST's root (olddir made there).
    assert_eq!(
        (inc.copied, inc.attrs_updated, inc.deleted),
        (2, 2, 0),
        "{inc}"
    );
    assert!(dst.join("dir/extra.txt").exists());
    let mut del = o.clone();
    del.delete = true;
    let d = go(&LocalDir::new(&src), &LocalDir::new(&dst), &del, &none);
    assert_eq!((d.copied, d.deleted), (0, 2), "{d}");
    assert_same(
        &snapshot(&LocalDir::new(&src), true, false),
        &snapshot(&LocalDir::new(&dst), true, false),
    );

    // --check finds a change that size and mtime do not show.
    let before = std::fs::metadata(dst.join("a.txt")).unwrap();
    write(&dst.join("dir/sub/deep.txt"), b"DEEPER");
    set_times(
        &dst.join("dir/sub/deep.txt"),
        0,
        std::fs::metadata(src.join("dir/sub/deep.txt"))
            .unwrap()
            .mtime_nsec_total(),
    );
    let plain = go(&LocalDir::new(&src), &LocalDir::new(&dst), &o, &none);
    assert_eq!(plain.copied, 0, "size and mtime are equal: {plain}");
    let mut check = o.clone();
    check.check = true;
    let ch = go(&LocalDir::new(&src), &LocalDir::new(&dst), &check, &none);
    assert_eq!(ch.copied, 1, "{ch}");
    assert_eq!(
        std::fs::read(dst.join("dir/sub/deep.txt")).unwrap(),
        b"deeper"
    );
    assert_eq!(
        std::fs::metadata(dst.join("a.txt")).unwrap().len(),
        before.len()
    );
}

trait MtimeNs {
    fn mtime_nsec_total(&self) -> i64;
}
impl MtimeNs for std::fs::Metadata {
    fn mtime_nsec_total(&self) -> i64 {
        use std::os::unix::fs::MetadataExt;
        self.mtime() * 1_000_000_000 + self.mtime_nsec()
    }
}

#[test]
fn include_exclude_first_match_wins() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, state) = (
        t.path().join("src"),
        t.path().join("dst"),
        t.path().join("state"),
    );
    for p in [
        "keep.log",
        "drop.log",
        "a/x.txt",
        "a/cache/c.txt",
        "b/y.bin",
        "b/z.txt",
    ] {
        write(&src.join(p), p.as_bytes());
    }
    let f = Filter::new(&[
        (true, "keep.log".into()),
        (false, "*.log".into()),
        (false, "cache/".into()),
        (false, "/b/*.bin".into()),
    ])
    .unwrap();
    go(
        &LocalDir::new(&src),
        &LocalDir::new(&dst),
        &opts(&state),
        &f,
    );
    let got: Vec<String> = snapshot(&LocalDir::new(&dst), false, false)
        .into_iter()
        .filter(|(_, s)| s.kind == Kind::File)
        .map(|(p, _)| p)
        .collect();
    assert_eq!(got, ["a/x.txt", "b/z.txt", "keep.log"]);
    // --delete leaves excluded entries at DST alone.
    write(&dst.join("other.log"), b"excluded, so kept");
    write(&dst.join("gone.txt"), b"not at src");
    let mut o = opts(&state);
    o.delete = true;
    let d = go(&LocalDir::new(&src), &LocalDir::new(&dst), &o, &f);
    assert_eq!(d.deleted, 1, "{d}");
    assert!(dst.join("other.log").exists() && !dst.join("gone.txt").exists());
}

#[test]
fn local_to_volume_to_volume_keeps_everything() {
    let t = tempfile::tempdir().unwrap();
    let (src, state) = (t.path().join("src"), t.path().join("state"));
    rich_tree(&src);
    let a = new_volume(t.path(), "vol-a");
    let b = new_volume(t.path(), "vol-b");
    let none = Filter::default();
    let o = opts(&state);
    {
        let va = vol(&a, "/data/in", false);
        let s = go(&LocalDir::new(&src), &va, &o, &none);
        assert_eq!((s.copied, s.linked), (6, 2), "{s}");
    }
    let local = snapshot(&LocalDir::new(&src), true, false);
    let va = vol(&a, "/data/in", true);
    assert_same(&local, &snapshot(&va, true, false));
    drop(va);
    {
        let (va, vb) = (vol(&a, "data/in", true), vol(&b, "/", false));
        let s = go(&va, &vb, &o, &none);
        assert_eq!((s.copied, s.linked, s.failed), (6, 2, 0), "{s}");
        assert!(
            s.token.is_some(),
            "a Strata source reports its change token: {s}"
        );
        assert!(s.src.meta_calls > 0 && s.src.lists == 4, "{s}");
    }
    let (va, vb) = (vol(&a, "/data/in", true), vol(&b, "/", true));
    // Between volumes the access times are kept too.
    assert_same(&snapshot(&va, true, true), &snapshot(&vb, true, true));
    // And back to a local directory.
    let back = t.path().join("back");
    let s = go(&vb, &LocalDir::new(&back), &o, &none);
    assert_eq!(s.copied, 6, "{s}");
    assert_same(&local, &snapshot(&LocalDir::new(&back), true, false));
    drop((va, vb));
    // A second pass between the volumes copies nothing.
    let (va, vb) = (vol(&a, "/data/in", true), vol(&b, "/", false));
    let s = go(&va, &vb, &o, &none);
    assert_eq!((s.copied, s.linked, s.attrs_updated), (0, 0, 0), "{s}");
}

#[test]
fn strata_to_s3_and_s3_to_local() {
    let Some(weed) = SeaweedFs::for_test() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let (src, state) = (t.path().join("src"), t.path().join("state"));
    for i in 0..12 {
        write(
            &src.join(format!("d{}/f{i}.txt", i % 3)),
            format!("file {i}").repeat(i * 1000 + 1).as_bytes(),
        );
    }
    write(&src.join("top.bin"), &vec![7u8; 20 << 20]);
    std::os::unix::fs::symlink("top.bin", src.join("sym")).unwrap();
    let a = new_volume(t.path(), "vol-s3src");
    let none = Filter::default();
    let o = opts(&state);
    go(&LocalDir::new(&src), &vol(&a, "/", false), &o, &none);
    let access = S3Access {
        endpoint: weed.endpoint().to_string(),
        access_key: Some(weed.access_key().to_string()),
        secret_key: Some(weed.secret_key().to_string()),
        region: None,
    };
    let s3 = || {
        let d = S3Dir::open(
            "s3://sync-test/some/prefix",
            access.clone(),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        d.init().unwrap();
        d
    };
    let va = vol(&a, "/", true);
    let s = go(&va, &s3(), &o, &none);
    assert_eq!(
        (s.copied, s.unsupported),
        (13, 1),
        "the symlink cannot go to S3: {s}"
    );
    let again = go(&va, &s3(), &o, &none);
    assert_eq!((again.copied, again.skipped), (0, 13), "{again}");
    // S3 -> local: the same files and bytes; times are the objects' Last-Modified.
    let back = t.path().join("back");
    let s = go(&s3(), &LocalDir::new(&back), &o, &none);
    assert_eq!(s.copied, 13, "{s}");
    let mut want = snapshot(&va, false, false);
    want.remove("sym");
    assert_same(&want, &snapshot(&LocalDir::new(&back), false, false));
    let s = go(&s3(), &LocalDir::new(&back), &o, &none);
    assert_eq!(
        (s.copied, s.skipped),
        (0, 13),
        "times kept from Last-Modified: {s}"
    );
    drop(va);
    // A changed file goes again; --delete removes an object SRC no longer has.
    write(&src.join("d1/f1.txt"), b"changed, and longer than before");
    std::fs::remove_file(src.join("d2/f2.txt")).unwrap();
    let mut del = o.clone();
    del.delete = true;
    go(&LocalDir::new(&src), &vol(&a, "/", false), &del, &none);
    let s = go(&vol(&a, "/", true), &s3(), &del, &none);
    assert_eq!((s.copied, s.deleted), (1, 1), "{s}");
    assert!(s.dst.lists >= 4, "{s}");

    // Through the command line: endpoint by flag, keys from the AWS variables.
    let cli = |extra: &[&str]| {
        let mut args = vec![
            "sync",
            src.to_str().unwrap(),
            "s3://sync-test/cli",
            "--dst-endpoint",
            weed.endpoint(),
        ];
        args.extend_from_slice(extra);
        let state_s = state.display().to_string();
        args.extend_from_slice(&["--state-dir", &state_s, "--json", "--quiet"]);
        let out = Command::new(BIN)
            .args(&args)
            .env("STRATA_LOG", "warn")
            .env("AWS_ACCESS_KEY_ID", weed.access_key())
            .env("AWS_SECRET_ACCESS_KEY", weed.secret_key())
            .env_remove("AWS_ENDPOINT_URL")
            .output()
            .unwrap();
        json_summary(&out)
    };
    let first = cli(&["--exclude", "*.bin"]);
    assert_eq!(
        (first["copied"].as_u64(), first["unsupported"].as_u64()),
        (Some(11), Some(1)),
        "{first}"
    );
    let again = cli(&["--exclude", "*.bin"]);
    assert_eq!(
        (again["copied"].as_u64(), again["skipped"].as_u64()),
        (Some(0), Some(11)),
        "{again}"
    );
}

fn run_bin(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("STRATA_LOG", "warn")
        .output()
        .unwrap()
}

fn json_summary(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "strata sync failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn killed_run_resumes_without_recopying() {
    let t = tempfile::tempdir().unwrap();
    let (src, state) = (t.path().join("src"), t.path().join("state"));
    for d in 0..4 {
        for f in 0..10 {
            let data: Vec<u8> = (0..(1 << 20))
                .map(|i: u32| ((i + d * 10 + f) % 253) as u8)
                .collect();
            write(&src.join(format!("d{d}/f{f}.bin")), &data);
        }
    }
    let b = new_volume(t.path(), "vol-resume");
    let state_s = state.display().to_string();
    let src_s = src.display().to_string();
    // 40 MiB at 8 MiB/s: killed after 3.5 s, mid-copy (the first directory done and
    // checkpointed: the checkpoint reaches the kernel every second).
    let mut child = Command::new(BIN)
        .args([
            "sync",
            &src_s,
            &b,
            "--dst-path",
            "/copy",
            "--threads",
            "1",
            "--bwlimit",
            "8M",
            "--state-dir",
            &state_s,
        ])
        .env("STRATA_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(3500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "still copying when killed"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    // Files under their real names are complete; a partial one is under a temporary name.
    let done: Vec<String> = {
        let v = vol(&b, "/copy", true);
        snapshot(&v, true, false)
            .into_iter()
            .filter(|(p, s)| s.kind == Kind::File && !p.contains(".strata-sync."))
            .map(|(p, _)| p)
            .collect()
    };
    assert!(
        (5..40).contains(&done.len()),
        "killed mid-copy: {} files done",
        done.len()
    );
    let out = run_bin(&[
        "sync",
        &src_s,
        &b,
        "--dst-path",
        "/copy",
        "--state-dir",
        &state_s,
        "--json",
        "--quiet",
    ]);
    let s = json_summary(&out);
    assert_eq!(
        s["copied"].as_u64().unwrap(),
        40 - done.len() as u64,
        "only what was not done is copied: {s}"
    );
    assert!(
        s["resumed_dirs"].as_u64().unwrap() >= 1,
        "finished directories are not listed again: {s}"
    );
    let v = vol(&b, "/copy", true);
    assert_same(
        &snapshot(&LocalDir::new(&src), true, false),
        &snapshot(&v, true, false),
    );
    drop(v);
    // The pass finished: the next run is a new full pass that copies nothing.
    let s = json_summary(&run_bin(&[
        "sync",
        &src_s,
        &b,
        "--dst-path",
        "/copy",
        "--state-dir",
        &state_s,
        "--json",
        "--quiet",
    ]));
    assert_eq!(
        (
            s["copied"].as_u64(),
            s["skipped"].as_u64(),
            s["resumed_dirs"].as_u64()
        ),
        (Some(0), Some(40), Some(0)),
        "{s}"
    );
}

#[test]
fn since_visits_only_changed_directories() {
    let t = tempfile::tempdir().unwrap();
    let (src, state) = (t.path().join("src"), t.path().join("state"));
    for d in 0..100 {
        for f in 0..10 {
            write(
                &src.join(format!("d{d:02}/f{f}.txt")),
                format!("{d} {f}").as_bytes(),
            );
        }
    }
    let a = new_volume(t.path(), "vol-journal-a");
    let b = new_volume(t.path(), "vol-journal-b");
    go(
        &LocalDir::new(&src),
        &vol(&a, "/", false),
        &opts(&state),
        &Filter::default(),
    );
    let state_s = state.display().to_string();
    let full = json_summary(&run_bin(&[
        "sync",
        &a,
        &b,
        "--state-dir",
        &state_s,
        "--json",
        "--quiet",
    ]));
    assert_eq!(full["copied"].as_u64(), Some(1000), "{full}");
    assert_eq!(full["dirs"].as_u64(), Some(101), "{full}");
    let token = full["token"].as_str().unwrap().to_string();

    // 10 files in 3 directories are rewritten in place (their directories' entries do not change).
    {
        let va = vol(&a, "/", false);
        let vfs = va.vfs();
        for (d, f) in [
            (3, 0),
            (3, 1),
            (3, 2),
            (3, 3),
            (47, 5),
            (47, 6),
            (47, 7),
            (98, 0),
            (98, 8),
            (98, 9),
        ] {
            let dir = vfs
                .lookup(strata::meta::ROOT_INO, format!("d{d:02}").as_bytes())
                .unwrap();
            let n = vfs.lookup(dir.ino, format!("f{f}.txt").as_bytes()).unwrap();
            let (fh, _) = vfs.open(n.ino, true).unwrap();
            vfs.write(n.ino, 0, format!("changed {d} {f}!").as_bytes())
                .unwrap();
            vfs.flush(n.ino).unwrap();
            vfs.release(n.ino, fh, None).unwrap();
        }
    }
    let inc = json_summary(&run_bin(&[
        "sync",
        &a,
        &b,
        "--state-dir",
        &state_s,
        "--since",
        "auto",
        "--json",
        "--quiet",
    ]));
    assert_eq!(inc["since"].as_str(), Some(token.as_str()), "{inc}");
    assert_eq!(inc["changed_dirs"].as_u64(), Some(3), "{inc}");
    assert_eq!(inc["copied"].as_u64(), Some(10), "{inc}");
    assert_eq!(inc["dirs"].as_u64(), Some(3), "{inc}");
    assert_eq!(inc["src"]["lists"].as_u64(), Some(3), "{inc}");
    assert_eq!(inc["dst"]["lists"].as_u64(), Some(3), "{inc}");
    assert!(
        inc["src"]["path_lists"].as_u64().unwrap() <= 1,
        "the root listed once to name the directories: {inc}"
    );
    let (full_calls, inc_calls) = (
        full["src"]["meta_calls"].as_u64().unwrap(),
        inc["src"]["meta_calls"].as_u64().unwrap(),
    );
    assert!(
        inc_calls * 20 < full_calls,
        "metadata calls follow the change: {inc_calls} vs {full_calls} ({inc})"
    );
    let (va, vb) = (vol(&a, "/", true), vol(&b, "/", true));
    assert_same(&snapshot(&va, true, true), &snapshot(&vb, true, true));
    drop((va, vb));
    // Nothing changed since: an empty pass.
    let none = json_summary(&run_bin(&[
        "sync",
        &a,
        &b,
        "--state-dir",
        &state_s,
        "--since",
        "auto",
        "--json",
        "--quiet",
    ]));
    assert_eq!(
        (
            none["changed_dirs"].as_u64(),
            none["copied"].as_u64(),
            none["src"]["lists"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{none}"
    );
    // A removed file: its directory is visited (and the root, since the directory's times
    // changed), --delete removes the file at DST.
    {
        let va = vol(&a, "/", false);
        let vfs = va.vfs();
        let dir = vfs.lookup(strata::meta::ROOT_INO, b"d50").unwrap();
        vfs.unlink(dir.ino, b"f0.txt").unwrap();
    }
    let del = json_summary(&run_bin(&[
        "sync",
        &a,
        &b,
        "--state-dir",
        &state_s,
        "--since",
        "auto",
        "--delete",
        "--json",
        "--quiet",
    ]));
    assert_eq!(
        (
            del["changed_dirs"].as_u64(),
            del["dirs"].as_u64(),
            del["deleted"].as_u64()
        ),
        (Some(2), Some(2), Some(1)),
        "{del}"
    );
    let vb = vol(&b, "/", true);
    let d50 = vb.vfs().lookup(strata::meta::ROOT_INO, b"d50").unwrap();
    assert!(vb.vfs().lookup(d50.ino, b"f0.txt").is_err());
    let va = vol(&a, "/", true);
    assert_same(&snapshot(&va, true, true), &snapshot(&vb, true, true));
    drop((va, vb));
    // A token of another database is refused by the journal: a full pass instead.
    let other = json_summary(&run_bin(&[
        "sync",
        &a,
        &b,
        "--state-dir",
        &state_s,
        "--since",
        "0123456789abcdef.1",
        "--json",
        "--quiet",
    ]));
    assert!(other["full_because"].is_string(), "{other}");
    assert_eq!(
        (other["dirs"].as_u64(), other["copied"].as_u64()),
        (Some(101), Some(0)),
        "{other}"
    );
}

#[test]
fn bad_input_is_named() {
    let t = tempfile::tempdir().unwrap();
    let err = |args: &[&str]| {
        let out = run_bin(args);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let missing = t.path().join("nope").display().to_string();
    let dst = t.path().join("dst").display().to_string();
    let state = t.path().join("state").display().to_string();
    assert!(err(&["sync", &missing, &dst, "--state-dir", &state]).contains("does not exist"));
    assert!(err(&["sync", "ftp://x/y", &dst]).contains("unsupported scheme"));
    assert!(err(&["sync", &dst, &dst, "--src-path", "/x"]).contains("--src-path"));
    assert!(err(&["sync", &dst, &dst, "--bwlimit", "fast"]).contains("--bwlimit"));
    std::fs::create_dir_all(t.path().join("dst")).unwrap();
    assert!(
        err(&["sync", &dst, &dst, "--since", "auto", "--state-dir", &state])
            .contains("change journal")
    );
    let start = Instant::now();
    assert!(
        err(&[
            "sync",
            &dst,
            &dst,
            "--exclude",
            "a[b",
            "--state-dir",
            &state
        ])
        .contains("unbalanced")
    );
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn postgres_volume_to_sqlite_volume_with_since() {
    let pg = strata::testing::postgres::PgServer::start().unwrap_or_else(|e| panic!("{e}"));
    let t = tempfile::tempdir().unwrap();
    let (src, state) = (t.path().join("src"), t.path().join("state"));
    for d in 0..5 {
        for f in 0..4 {
            write(
                &src.join(format!("p/d{d}/f{f}")),
                format!("{d}.{f}").as_bytes(),
            );
        }
    }
    let a = pg.new_database();
    let opts_a = FormatOptions {
        name: "vol-pg".into(),
        storage: StorageConfig {
            storage: "file".into(),
            bucket: t.path().join("pg-objects").display().to_string(),
            access_key: None,
            secret_key: None,
            region: None,
        },
        block_size_kib: 1024,
        capacity_gib: 0,
        inodes: 0,
    };
    volume::format(&a, &opts_a, Arc::new(Metrics::new())).unwrap();
    let b = new_volume(t.path(), "vol-from-pg");
    let none = Filter::default();
    let o = opts(&state);
    go(&LocalDir::new(&src), &vol(&a, "/", false), &o, &none);
    let full = go(&vol(&a, "/p", true), &vol(&b, "/q", false), &o, &none);
    assert_eq!((full.copied, full.dirs), (20, 6), "{full}");
    {
        let va = vol(&a, "/", false);
        let vfs = va.vfs();
        let p = vfs.lookup(strata::meta::ROOT_INO, b"p").unwrap();
        let d = vfs.lookup(p.ino, b"d2").unwrap();
        for f in ["f1", "f3"] {
            let n = vfs.lookup(d.ino, f.as_bytes()).unwrap();
            let (fh, _) = vfs.open(n.ino, true).unwrap();
            vfs.write(n.ino, 0, b"rewritten").unwrap();
            vfs.release(n.ino, fh, None).unwrap();
        }
    }
    let mut since = o.clone();
    since.since = Some(sync::Since::Auto);
    let inc = go(&vol(&a, "/p", true), &vol(&b, "/q", false), &since, &none);
    assert_eq!(
        (inc.changed_dirs, inc.dirs, inc.copied, inc.src.lists),
        (Some(1), 1, 2, 1),
        "{inc}"
    );
    assert_same(
        &snapshot(&vol(&a, "/p", true), true, true),
        &snapshot(&vol(&b, "/q", true), true, true),
    );
}
