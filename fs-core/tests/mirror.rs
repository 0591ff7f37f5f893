//! Moving a volume to another object store while it is in use (issue #17): two SeaweedFS
//! servers stand for two clouds, the new one "far" behind a proxy that adds latency and
//! limits bandwidth. A writer appends and fsyncs, a reader checks what was
//! written, while the mirror is added, copied, made the primary and the old store detached
//! and stopped; neither sees an error or a pause over 2 s, and afterwards every byte reads
//! back from the new store alone.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use strata::testing::mount::{self, TestMount};
use strata::testing::seaweedfs::{SeaweedFs, skip_s3};

const BIN: &str = env!("CARGO_BIN_EXE_strata");
const RECORD: usize = 64 << 10;

fn record(i: u64) -> Vec<u8> {
    let mut v = vec![0u8; RECORD];
    for (j, b) in v.iter_mut().enumerate() {
        *b = ((i as usize * 31 + j * 7) % 251) as u8;
    }
    v
}

/// Run `strata ARGS`: its stdout and stderr, as `Err` when it failed.
fn try_strata(args: &[&str]) -> Result<String, String> {
    let out = Command::new(BIN).args(args).output().expect("run strata");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

fn strata(args: &[&str]) -> String {
    try_strata(args).unwrap_or_else(|text| panic!("strata {args:?} failed: {text}"))
}

fn status(meta: &str) -> serde_json::Value {
    serde_json::from_str(&strata(&["status", meta])).expect("status JSON")
}

/// Drop the kernel's cached pages of a file so reads go to the client.
fn drop_cache(f: &fs::File) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a valid descriptor; advice only.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Check records `0..upto`; returns the longest single read (a reader's pause).
fn check_records(path: &Path, upto: u64) -> Result<Duration, String> {
    let mut f = fs::File::open(path).map_err(|e| e.to_string())?;
    drop_cache(&f);
    let mut buf = vec![0u8; RECORD];
    let mut worst = Duration::ZERO;
    for i in 0..upto {
        f.seek(SeekFrom::Start(i * RECORD as u64))
            .map_err(|e| e.to_string())?;
        let t = Instant::now();
        f.read_exact(&mut buf)
            .map_err(|e| format!("record {i}: {e}"))?;
        worst = worst.max(t.elapsed());
        if buf != record(i) {
            return Err(format!("record {i} of {} differs", path.display()));
        }
    }
    Ok(worst)
}

/// A TCP proxy on 127.0.0.1 to `endpoint` (`http://host:port`) adding `delay` to every burst
/// and limiting each direction to `rate` bytes/s; returns its `http://127.0.0.1:PORT`.
fn far_proxy(endpoint: &str, delay: Duration, rate: u64) -> String {
    use std::net::{TcpListener, TcpStream};
    let target = endpoint.trim_start_matches("http://").to_string();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let pipe = move |mut from: TcpStream, mut to: TcpStream| {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            std::thread::sleep(delay + Duration::from_secs_f64(n as f64 / rate as f64));
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    };
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { break };
            let Ok(s) = TcpStream::connect(&target) else {
                continue;
            };
            let (c2, s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
            std::thread::spawn(move || pipe(c, s));
            std::thread::spawn(move || pipe(s2, c2));
        }
    });
    format!("http://{addr}")
}

#[test]
fn a_volume_moves_to_another_store_while_a_writer_and_a_reader_keep_going() {
    if skip_s3() {
        return;
    }
    let old = SeaweedFs::start().expect("first SeaweedFS");
    let new = SeaweedFs::start().expect("second SeaweedFS");
    let dir = tempfile::tempdir().unwrap();
    let meta = format!("sqlite://{}/meta.db", dir.path().display());
    let old_bucket = format!("{}/strata-mirror-old", old.endpoint());
    // The new store is "far": reached through a proxy that adds 20 ms to every burst of
    // bytes and holds each direction to 16 MiB/s.
    let far = far_proxy(new.endpoint(), Duration::from_millis(20), 16 << 20);
    let new_bucket = format!("{far}/strata-mirror-new");
    mount::format(
        BIN,
        &[
            "--storage",
            "s3",
            "--bucket",
            &old_bucket,
            "--access-key",
            old.access_key(),
            "--secret-key",
            old.secret_key(),
            "--block-size",
            "256",
            &meta,
            "movevol",
        ],
    );
    // Small caches, so the reader's checks go to the object store.
    let mut m = TestMount::new(
        BIN,
        &meta,
        &dir.path().join("mnt"),
        &["--cache-size", "0", "--mem-cache-size", "4"],
    );
    // Data that exists before the mirror: the copier has to bring it over.
    let existing: u64 = 160; // 10 MiB in 64 KiB records
    {
        let mut f = fs::File::create(m.path.join("existing.bin")).unwrap();
        for i in 0..existing {
            f.write_all(&record(i)).unwrap();
        }
        f.sync_all().unwrap();
    }

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written, path) = (stop.clone(), written.clone(), m.path.join("log.bin"));
        std::thread::spawn(move || -> Result<Duration, String> {
            let mut f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o644)
                .open(&path)
                .map_err(|e| e.to_string())?;
            let mut worst = Duration::ZERO;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                f.write_all(&record(i))
                    .and_then(|_| f.sync_data())
                    .map_err(|e| format!("append {i}: {e}"))?;
                worst = worst.max(t.elapsed());
                i += 1;
                written.store(i, Ordering::Release);
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(worst)
        })
    };
    let reader = {
        let (stop, written, dirp) = (stop.clone(), written.clone(), m.path.clone());
        std::thread::spawn(move || -> Result<(Duration, u64), String> {
            let mut worst = Duration::ZERO;
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) {
                let a = check_records(&dirp.join("existing.bin"), existing)?;
                let b = check_records(&dirp.join("log.bin"), written.load(Ordering::Acquire))?;
                worst = worst.max(a).max(b);
                rounds += 1;
            }
            Ok((worst, rounds))
        })
    };
    std::thread::sleep(Duration::from_secs(2));

    // 1. Add the mirror; the mount copies the existing objects in the background.
    strata(&[
        "config",
        &meta,
        "--mirror",
        &new_bucket,
        "--mirror-access-key",
        new.access_key(),
        "--mirror-secret-key",
        new.secret_key(),
    ]);
    let err = Command::new(BIN)
        .args(["config", &meta, "--switch-primary"])
        .output()
        .unwrap();
    assert!(
        !err.status.success(),
        "switch before the copy must be refused"
    );
    let t = Instant::now();
    loop {
        let s = status(&meta);
        let mirror = &s["mirror"];
        if mirror["copy_done"] == true && mirror["backlog"] == 0 {
            assert!(mirror["objects_copied"].as_u64().unwrap() >= 40, "{mirror}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the mirror did not catch up: {mirror}\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("mirror caught up in {:.1} s", t.elapsed().as_secs_f64());

    // 2. Switch: the mount follows within seconds, without remounting.
    strata(&["config", &meta, "--switch-primary"]);
    std::thread::sleep(Duration::from_secs(5));
    let s = status(&meta);
    let applied = s["sessions"][0]["info"].as_str().unwrap().to_string();
    assert!(
        s["setting"]["storage"]["bucket"] == new_bucket.as_str(),
        "{s}"
    );
    // 3. Detach the old store, then stop its server.
    // The writer keeps going, so a put may be between its two stores (backlog 1) at the
    // moment of the command, which then refuses: try again, as an operator would.
    let t = Instant::now();
    while let Err(text) = try_strata(&["config", &meta, "--mirror", "none"]) {
        assert!(
            text.contains("mirror backlog") && t.elapsed() < Duration::from_secs(60),
            "strata config --mirror none failed: {text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(5));
    drop(old);
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let wworst = writer.join().unwrap().expect("the writer saw an error");
    let (rworst, rounds) = reader.join().unwrap().expect("the reader saw an error");
    eprintln!(
        "worst append+fsync {:.3} s, worst 64 KiB read {:.3} s over {rounds} check rounds, {} records appended; session said {applied}",
        wworst.as_secs_f64(),
        rworst.as_secs_f64(),
        written.load(Ordering::Relaxed)
    );
    assert!(wworst < Duration::from_secs(2), "writer paused {wworst:?}");
    assert!(rworst < Duration::from_secs(2), "reader paused {rworst:?}");
    assert!(rounds >= 3, "reader made only {rounds} rounds");

    // Everything reads back from the new store alone (the old server is gone), also after
    // a remount with cold caches; the metadata is clean.
    m.unmount();
    m.remount();
    let n = written.load(Ordering::Relaxed);
    check_records(&m.path.join("existing.bin"), existing).unwrap();
    check_records(&m.path.join("log.bin"), n).unwrap();
    m.unmount();
    let fsck = strata(&["fsck", &meta]);
    assert!(fsck.contains(" 0 problems"), "{fsck}");
    assert!(status(&meta)["mirror"].is_null());
}
