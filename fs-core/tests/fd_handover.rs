//! FUSE descriptor handover with real mounts: a keeper (this test, as the CSI node plugin
//! would) mounts /dev/fuse and hands the descriptor to `strata mount --fuse-fd-socket`; the
//! client is killed with SIGKILL while files are open, a new client takes the same
//! descriptor over, and the mount, an existing bind mount of it and the open file keep
//! working.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strata::fusefd::{FdKeeper, mount_fuse};

const BIN: &str = env!("CARGO_BIN_EXE_strata");

struct Guard {
    children: Vec<Child>,
    mounts: Vec<PathBuf>,
    /// Files open on the mount: closed only after the connections are aborted.
    file: Option<fs::File>,
}

/// Abort the FUSE connection mounted at `mp` (through fusectl), so that nothing waits for a
/// client that is gone; found through /proc/self/mountinfo (a stat could hang).
fn abort_connection(mp: &Path) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = mp.to_string_lossy();
    for l in info.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        if f.get(4) == Some(&want.as_ref())
            && let Some(minor) = f.get(2).and_then(|d| d.split(':').nth(1))
        {
            let ctl = Path::new("/sys/fs/fuse/connections");
            if !ctl.join(minor).exists() {
                let _ = Command::new("mount")
                    .args(["-t", "fusectl", "none"])
                    .arg(ctl)
                    .status();
            }
            let _ = fs::write(ctl.join(minor).join("abort"), b"1");
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for m in self.mounts.iter().rev() {
            abort_connection(m);
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        self.file.take();
    }
}

/// Run `f` on a thread; `None` when it has not finished within `limit` (the thread is left
/// blocked until the guard aborts the connection).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

/// The clients' disk cache: beside their log, in the test's directory.
fn cache_dir(log: &Path) -> std::path::PathBuf {
    log.with_file_name("cache")
}

fn client(sock: &Path, meta: &str, mp: &Path, log: &Path) -> Child {
    Command::new(BIN)
        .args(["--log-level", "info", "mount", "--fuse-fd-socket"])
        .arg(sock)
        .arg(meta)
        .arg(mp)
        .env("STRATA_CACHE_DIR", cache_dir(log))
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .expect("start strata mount")
}

/// A client started later by a shell forked now: a process that has files open on the
/// mount must not fork the next client itself, because the child's close-on-exec of those
/// files sends FLUSH to a connection nobody serves yet (a deadlock, as for any FUSE server).
fn deferred_client(sock: &Path, meta: &str, mp: &Path, log: &Path) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg("read _go && exec \"$0\" \"$@\"")
        .arg(BIN)
        .args(["--log-level", "info", "mount", "--fuse-fd-socket"])
        .arg(sock)
        .arg(meta)
        .arg(mp)
        .env("STRATA_CACHE_DIR", cache_dir(log))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .expect("start sh")
}

fn go(c: &mut Child) {
    c.stdin.take().unwrap().write_all(b"go\n").unwrap();
}

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn killed_client_is_replaced_on_the_same_connection() {
    if !root() {
        eprintln!("skipped: mounting with a handed-over /dev/fuse needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let meta = format!("sqlite://{}/meta.db", dir.path().display());
    let objects = dir.path().join("objects");
    strata::testing::mount::format(
        BIN,
        &[
            "--storage",
            "file",
            "--bucket",
            &objects.to_string_lossy(),
            &meta,
            "fdtest",
        ],
    );
    let mp = dir.path().join("mnt");
    let bind = dir.path().join("bind");
    fs::create_dir_all(&mp).unwrap();
    fs::create_dir_all(&bind).unwrap();
    let sock = dir.path().join("fd.sock");
    let log1 = dir.path().join("client1.log");
    let log2 = dir.path().join("client2.log");
    let mut g = Guard {
        children: vec![],
        mounts: vec![],
        file: None,
    };

    let dev = mount_fuse(&mp, "strata:fdtest", false).expect("mount /dev/fuse");
    g.mounts.push(mp.clone());
    let keeper = FdKeeper::start(&sock, Some(dev), false).unwrap();
    g.children.push(client(&sock, &meta, &mp, &log1));
    assert!(
        keeper.wait_serving(Duration::from_secs(20)),
        "client 1 did not serve: {}",
        fs::read_to_string(&log1).unwrap_or_default()
    );

    let mut c2 = deferred_client(&sock, &meta, &mp, &log2);
    let mut c3 = deferred_client(&sock, &meta, &mp, &dir.path().join("client3.log"));
    fs::create_dir(mp.join("sub")).unwrap();
    fs::write(mp.join("sub/a.txt"), b"hello").unwrap();
    let st = Command::new("mount")
        .arg("--bind")
        .arg(mp.join("sub"))
        .arg(&bind)
        .status()
        .unwrap();
    assert!(st.success());
    g.mounts.push(bind.clone());
    let open = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(bind.join("a.txt"))
        .unwrap();
    let open = g.file.insert(open);
    let mut s = String::new();
    open.read_to_string(&mut s).unwrap();
    assert_eq!(s, "hello");

    // SIGKILL the client: no flush, no unmount.
    let mut c1 = g.children.remove(0);
    c1.kill().unwrap();
    c1.wait().unwrap();
    let killed = Instant::now();
    go(&mut c2);
    g.children.push(c2);

    // A reader of the bind mount succeeds again without any remount.
    let b2 = bind.clone();
    let ok = within(Duration::from_secs(5), move || {
        while fs::read(b2.join("a.txt")).map_or(true, |b| b != b"hello") {
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let took = killed.elapsed();
    let status = g.children[0].try_wait().unwrap();
    assert!(
        ok.is_some(),
        "bind mount not readable within 5 s of the kill (client 2 status {status:?}): client 1: {} client 2: {}",
        fs::read_to_string(&log1).unwrap_or_default(),
        fs::read_to_string(&log2).unwrap_or_default()
    );
    eprintln!("reader succeeded {:.3} s after SIGKILL", took.as_secs_f64());
    assert!(keeper.initialised());

    // The file opened through the dead client still reads and writes (adopted handle).
    open.seek(SeekFrom::Start(0)).unwrap();
    open.write_all(b"HELLO").unwrap();
    open.sync_all().unwrap();
    let mut s = String::new();
    open.seek(SeekFrom::Start(0)).unwrap();
    open.read_to_string(&mut s).unwrap();
    assert_eq!(s, "HELLO");
    g.file.take();
    // New files, listings, through both paths.
    fs::write(bind.join("b.txt"), b"world").unwrap();
    assert_eq!(fs::read(mp.join("sub/b.txt")).unwrap(), b"world");
    let mut names: Vec<String> = fs::read_dir(&bind)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a.txt", "b.txt"]);
    // A directory handle opened by the first client is read by the second.
    assert_eq!(fs::read_dir(mp.join("sub")).unwrap().count(), 2);

    // A second kill and restart works too (resume of a resumed connection).
    let mut c2 = g.children.remove(0);
    c2.kill().unwrap();
    c2.wait().unwrap();
    go(&mut c3);
    g.children.push(c3);
    let b3 = bind.clone();
    let served = within(Duration::from_secs(5), move || {
        while fs::read(b3.join("b.txt")).is_err() {
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    assert!(served.is_some(), "third client did not serve within 5 s");
    assert_eq!(fs::read(mp.join("sub/a.txt")).unwrap(), b"HELLO");

    // Unmounting ends the connection: the client exits by itself.
    Command::new("umount").arg(&bind).status().unwrap();
    Command::new("umount").arg(&mp).status().unwrap();
    g.mounts.clear();
    let mut c3 = g.children.remove(0);
    let t = Instant::now();
    loop {
        if let Some(st) = c3.try_wait().unwrap() {
            assert!(st.success(), "client exit status {st}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "client did not exit after unmount"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    keeper.stop();
}
