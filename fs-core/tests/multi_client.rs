//! Several clients on one volume with the PostgreSQL engine (real server, real FUSE mounts
//! in separate processes): close-to-open, concurrent creates in one directory, locks that
//! exclude across clients and are released when a client dies, and a database restart under
//! load.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata::testing::mount::{self, TestMount};
use strata::testing::postgres::PgServer;

const BIN: &str = env!("CARGO_BIN_EXE_strata");

/// These tests run several servers and mounts each; on a 2-core machine they run one at a
/// time so that timing assertions measure Strata, not CPU starvation.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn volume(pg: &PgServer, dir: &Path) -> String {
    let url = pg.new_database();
    let data = dir.join("data");
    mount::format(BIN, &["--bucket", data.to_str().unwrap(), &url, "shared"]);
    url
}

#[test]
fn two_clients_see_each_other_and_create_concurrently() {
    let _serial = serial();
    let pg = PgServer::start().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let url = volume(&pg, dir.path());
    let a = TestMount::new(BIN, &url, &dir.path().join("a"), &[]);
    let b = TestMount::new(BIN, &url, &dir.path().join("b"), &[]);

    // Close-to-open: written and closed on A, opened and read on B.
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::File::create(a.path.join("model.bin"))
        .unwrap()
        .write_all(&data)
        .unwrap();
    let mut got = Vec::new();
    fs::File::open(b.path.join("model.bin"))
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(got == data, "B read {} bytes, not what A wrote", got.len());

    // 2 x 1,000 creates in one directory from both clients at once.
    fs::create_dir(a.path.join("d")).unwrap();
    let handles: Vec<_> = [(a.path.clone(), "a"), (b.path.clone(), "b")]
        .into_iter()
        .map(|(root, tag)| {
            std::thread::spawn(move || {
                for i in 0..1000 {
                    let p = root.join("d").join(format!("{tag}-{i}"));
                    fs::File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for m in [&a, &b] {
        let n = fs::read_dir(m.path.join("d")).unwrap().count();
        assert_eq!(n, 2000, "entries seen through {}", m.path.display());
    }
    // Renames are atomic for everyone.
    fs::rename(a.path.join("model.bin"), a.path.join("d/model.bin")).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert!(!b.path.join("model.bin").exists());
    assert_eq!(
        fs::metadata(b.path.join("d/model.bin")).unwrap().len(),
        data.len() as u64
    );
    drop((a, b));
    let out = Command::new(BIN).args(["fsck", &url]).output().unwrap();
    assert!(
        out.status.success(),
        "fsck: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn flock_nb(f: &fs::File) -> bool {
    // SAFETY: flock on an open descriptor.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[test]
fn locks_exclude_across_clients_and_die_with_their_client() {
    let _serial = serial();
    let pg = PgServer::start().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let url = volume(&pg, dir.path());
    let mut a = TestMount::new(
        BIN,
        &url,
        &dir.path().join("a"),
        &["--session-timeout", "4"],
    );
    let b = TestMount::new(
        BIN,
        &url,
        &dir.path().join("b"),
        &["--session-timeout", "4"],
    );
    fs::write(a.path.join("lock"), b"x").unwrap();

    let fa = fs::File::open(a.path.join("lock")).unwrap();
    assert!(flock_nb(&fa), "A takes the lock");
    let fb = fs::File::open(b.path.join("lock")).unwrap();
    assert!(!flock_nb(&fb), "B must not get A's lock");

    // A blocking waiter on B is woken when A unlocks.
    let waiter = {
        let p = b.path.join("lock");
        std::thread::spawn(move || {
            let f = fs::File::open(p).unwrap();
            let t = Instant::now();
            // SAFETY: flock on an open descriptor.
            assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
            let waited = t.elapsed();
            // SAFETY: as above.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
            waited
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    drop(fa);
    let waited = waiter.join().unwrap();
    assert!(
        waited >= Duration::from_millis(300),
        "waiter did not wait: {waited:?}"
    );

    // A takes it again and dies: B gets it once A's session expires.
    let fa = fs::File::open(a.path.join("lock")).unwrap();
    assert!(flock_nb(&fa));
    assert!(!flock_nb(&fb));
    a.kill9();
    std::mem::forget(fa); // its mount is gone
    let t = Instant::now();
    while !flock_nb(&fb) {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "lock of the killed client not released"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "lock released {:?} after the holder was killed",
        t.elapsed()
    );
}

/// The load runs in a child process: a test process holding files open on the mount must
/// not spawn the database server (exec closes inherited descriptors, which is a FUSE flush
/// that waits for the database being started).
const LOAD: &str = r#"
import os, sys, time
root, stop = sys.argv[1], sys.argv[2]
i = 0
while not os.path.exists(stop):
    t = time.time()
    p = os.path.join(root, "f%d" % i)
    try:
        fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, b"file %d" % i)
        os.fsync(fd)
        os.close(fd)
    except OSError as e:
        print("error", i, e, flush=True)
        break
    print(i, t, time.time(), flush=True)
    i += 1
"#;

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn database_restart_under_load_stalls_then_resumes() {
    let _serial = serial();
    let pg = PgServer::start().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let url = volume(&pg, dir.path());
    let a = TestMount::new(BIN, &url, &dir.path().join("a"), &[]);
    let stop = dir.path().join("stop");
    let load = Command::new("python3")
        .args(["-c", LOAD])
        .arg(&a.path)
        .arg(&stop)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 for the load generator");
    std::thread::sleep(Duration::from_secs(1));
    pg.stop();
    std::thread::sleep(Duration::from_secs(3));
    pg.restart().unwrap();
    let back = unix_now();
    std::thread::sleep(Duration::from_secs(3));
    fs::write(&stop, b"").unwrap();
    let out = load.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut n = 0;
    let (mut worst, mut after) = (0f64, 0);
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_ne!(f[0], "error", "an operation failed: {line}");
        let (start, end): (f64, f64) = (f[1].parse().unwrap(), f[2].parse().unwrap());
        worst = worst.max(end - start.max(back));
        after += (start > back) as usize;
        n += 1;
    }
    eprintln!(
        "{n} files written, {after} after the restart; longest wait after the database was back: {worst:.2} s"
    );
    let log = fs::read_to_string(a.path.with_extension("log")).unwrap_or_default();
    assert!(
        worst < 10.0,
        "operations resumed only after {worst:.1} s; client log:\n{log}"
    );
    assert!(
        after > 0,
        "nothing was written after the restart; client log:\n{log}"
    );
    for i in 0..n {
        assert_eq!(
            fs::read_to_string(a.path.join(format!("f{i}"))).unwrap(),
            format!("file {i}")
        );
    }
    drop(a);
    let out = Command::new(BIN).args(["fsck", &url]).output().unwrap();
    assert!(
        out.status.success(),
        "fsck after restart: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
