//! The file system on the S3 backend, against a real SeaweedFS server started by the test:
//! data written through a real mount, fsync'ed, survives a SIGKILL of the client; truncate
//! and O_TRUNC behave as on the local backend; objects really live in the bucket.

use std::fs;
use std::io::{Read, Write};

use strata::object::{ObjectStore, S3Store};
use strata::testing::mount::{self, TestMount};
use strata::testing::seaweedfs::SeaweedFs;

const BIN: &str = env!("CARGO_BIN_EXE_strata");

fn pattern(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

/// `strata format` of volume `name` in `bucket` of `weed`, 1 MiB blocks.
fn format_s3(weed: &SeaweedFs, meta: &str, bucket: &str, name: &str) {
    let bucket = format!("{}/{bucket}", weed.endpoint());
    mount::format(
        BIN,
        &[
            "--storage",
            "s3",
            "--bucket",
            &bucket,
            "--access-key",
            weed.access_key(),
            "--secret-key",
            weed.secret_key(),
            "--block-size",
            "1024",
            meta,
            name,
        ],
    );
}

#[test]
fn s3_volume_survives_kill9_and_truncates() {
    let Some(weed) = SeaweedFs::for_test() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let meta = format!("sqlite://{}/meta.db", dir.path().display());
    format_s3(&weed, &meta, "strata-s3-mount", "s3vol");
    let mut m = TestMount::new(BIN, &meta, &dir.path().join("mnt"), &[]);

    // fsync'ed data survives SIGKILL of the client.
    let data = pattern(24 << 20, 1);
    {
        let mut f = fs::File::create(m.path.join("ckpt.bin")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    m.kill9();
    m.remount();
    let mut got = Vec::new();
    fs::File::open(m.path.join("ckpt.bin"))
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert!(
        got == data,
        "fsync'ed data differs after SIGKILL ({} bytes read)",
        got.len()
    );

    // The objects are in the bucket, under the volume's prefix.
    let store = S3Store::new(weed.settings("strata-s3-mount")).unwrap();
    let objects = store.list("s3vol/chunks/", None, 1000).unwrap();
    assert!(
        objects.len() >= 24,
        "expected the data blocks in the bucket, found {}",
        objects.len()
    );

    // Shrink, grow, O_TRUNC rewrite.
    let p = m.path.join("ckpt.bin");
    let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(1000).unwrap();
    f.set_len(3 << 20).unwrap();
    drop(f);
    let mut back = Vec::new();
    fs::File::open(&p).unwrap().read_to_end(&mut back).unwrap();
    assert_eq!(back.len(), 3 << 20);
    assert!(back[..1000] == data[..1000], "kept prefix differs");
    assert!(
        back[1000..].iter().all(|&b| b == 0),
        "bytes after a shrink+grow must read as zero"
    );
    let second = pattern(5 << 20, 2);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.write_all(&second).unwrap();
    drop(f);
    m.unmount();
    m.remount();
    let mut back = Vec::new();
    fs::File::open(&p).unwrap().read_to_end(&mut back).unwrap();
    assert!(back == second, "O_TRUNC rewrite differs after remount");
}

/// Write-back on S3: close and fsync return while the store does not answer (the blocks are
/// staged on the local disk), the data reads back through the mount, survives a SIGKILL of
/// the client, and the next mount (without `--writeback`, same cache directory) uploads it.
#[test]
fn s3_writeback_stages_blocks_and_uploads_them_after_a_kill9() {
    if strata::testing::seaweedfs::skip_s3() {
        return;
    }
    // A server of its own: this test stops it.
    let weed = SeaweedFs::start().expect("starting SeaweedFS");
    let dir = tempfile::tempdir().unwrap();
    let meta = format!("sqlite://{}/meta.db", dir.path().display());
    format_s3(&weed, &meta, "strata-writeback", "wbvol");
    let cache = dir.path().join("cache");
    let cache_arg = cache.display().to_string();
    let mut m = TestMount::new(
        BIN,
        &meta,
        &dir.path().join("mnt"),
        &[
            "--writeback",
            "--cache-dir",
            &cache_arg,
            "--cache-size",
            "256",
            // Staging is refused on a file system below the free-space ratio (10 %); a full
            // scratch disk must not turn this test into one of direct uploads.
            "--free-space-ratio",
            "0.01",
        ],
    );
    let pid = weed.pid() as libc::pid_t;
    // SAFETY: kill(2) on the server this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    struct Resume(libc::pid_t);
    impl Drop for Resume {
        fn drop(&mut self) {
            // SAFETY: as above.
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    let resume = Resume(pid);

    let data = pattern(8 << 20, 7);
    let p = m.path.join("ckpt.bin");
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (p, data) = (p.clone(), data.clone());
        std::thread::spawn(move || {
            let res = (|| {
                let mut f = fs::File::create(&p)?;
                f.write_all(&data)?;
                f.sync_all()
            })();
            let _ = tx.send(res);
        });
    }
    // A hang guard, not a speed check: without write-back this waits for the stopped store.
    match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(res) => res.expect("write and fsync with the store stopped"),
        Err(_) => panic!(
            "write + fsync did not return while the store was stopped: {}",
            m.log()
        ),
    }
    let mut got = Vec::new();
    fs::File::open(&p).unwrap().read_to_end(&mut got).unwrap();
    assert!(
        got == data,
        "staged data read back through the mount differs"
    );

    let staged = walk(&cache);
    assert!(
        staged
            .iter()
            .filter(|p| p.to_string_lossy().contains("/staging/"))
            .count()
            >= 8,
        "expected the 8 blocks staged while the store is stopped: {staged:?}"
    );
    m.kill9();
    drop(resume);
    // The next mount, without --writeback, uploads what was left staged.
    let mut m = TestMount::new(
        BIN,
        &meta,
        &dir.path().join("mnt"),
        &["--cache-dir", &cache_arg, "--cache-size", "256"],
    );
    let store = S3Store::new(weed.settings("strata-writeback")).unwrap();
    let start = std::time::Instant::now();
    loop {
        let n = store.list("wbvol/chunks/", None, 1000).unwrap().len();
        if n >= 8 {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "{n} of 8 blocks uploaded after a minute: {}",
            m.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    m.unmount();
    // Read from the store alone: a fresh cache directory.
    let fresh = dir.path().join("cache2").display().to_string();
    let _m = TestMount::new(
        BIN,
        &meta,
        &dir.path().join("mnt"),
        &["--cache-dir", &fresh, "--cache-size", "256"],
    );
    let mut got = Vec::new();
    fs::File::open(&p).unwrap().read_to_end(&mut got).unwrap();
    assert!(
        got == data,
        "data read from the store after the upload differs"
    );
    let staging = cache.join(
        fs::read_dir(&cache)
            .unwrap()
            .next()
            .expect("the volume's cache directory")
            .unwrap()
            .file_name(),
    );
    let left: Vec<_> = walk(&staging.join("staging"));
    assert!(
        left.is_empty(),
        "staged files left after the upload: {left:?}"
    );
}

/// `--upload-delay`: with write-back, closed files wait on the local disk for the delay
/// (an hour here: nothing reaches the bucket while the test runs) and read back through the
/// mount; unmount uploads them at once. The option is refused without `--writeback` or
/// with a value that is not a duration, naming the fix.
#[test]
fn s3_upload_delay_holds_blocks_until_unmount() {
    let Some(weed) = SeaweedFs::for_test() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let meta = format!("sqlite://{}/meta.db", dir.path().display());
    format_s3(&weed, &meta, "strata-upload-delay", "udvol");
    let mnt = dir.path().join("mnt");
    let refused = |args: &[&str]| {
        fs::create_dir_all(&mnt).unwrap();
        let mut child = std::process::Command::new(BIN)
            .arg("mount")
            .args(args)
            .arg(&meta)
            .arg(&mnt)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if child.try_wait().unwrap().is_none() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::process::Command::new("fusermount3")
                .arg("-uz")
                .arg(&mnt)
                .status();
            panic!("strata mount {args:?} was not refused");
        }
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "strata mount {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = refused(&["--upload-delay", "5m"]);
    assert!(
        e.contains("--upload-delay") && e.contains("add --writeback"),
        "{e}"
    );
    let e = refused(&["--writeback", "--upload-delay", "5 minutes"]);
    assert!(e.contains("not a duration") && e.contains("30s"), "{e}");

    let cache = dir.path().join("cache").display().to_string();
    let mut m = TestMount::new(
        BIN,
        &meta,
        &mnt,
        &[
            "--writeback",
            "--upload-delay",
            "1h",
            "--cache-dir",
            &cache,
            "--cache-size",
            "256",
            "--free-space-ratio",
            "0.01",
        ],
    );
    let data = pattern(4 << 20, 11);
    let p = m.path.join("ckpt.bin");
    fs::write(&p, &data).unwrap();
    let store = S3Store::new(weed.settings("strata-upload-delay")).unwrap();
    let objects = || store.list("udvol/chunks/", None, 1000).unwrap().len();
    assert_eq!(objects(), 0, "uploaded before the delay: {}", m.log());
    assert!(
        fs::read(&p).unwrap() == data,
        "staged data read back differs"
    );
    m.unmount();
    assert_eq!(objects(), 4, "unmount uploads the 4 staged blocks at once");
    // From the store alone: a fresh cache directory.
    let fresh = dir.path().join("cache2").display().to_string();
    let _m = TestMount::new(
        BIN,
        &meta,
        &mnt,
        &["--cache-dir", &fresh, "--cache-size", "256"],
    );
    assert!(
        fs::read(&p).unwrap() == data,
        "data read from the store after unmount differs"
    );
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[test]
fn wrong_s3_credentials_are_reported_at_format() {
    let Some(weed) = SeaweedFs::for_test() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let meta = format!("sqlite://{}/meta.db", dir.path().display());
    let bucket = format!("{}/strata-badkeys", weed.endpoint());
    let out = std::process::Command::new(BIN)
        .args([
            "format",
            "--storage",
            "s3",
            "--bucket",
            &bucket,
            "--access-key",
            weed.access_key(),
        ])
        .args(["--secret-key", "not-the-secret", &meta, "badkeys"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("access denied") || err.contains("Denied") || err.contains("denied"),
        "{err}"
    );
    assert!(!err.contains("not-the-secret"), "secret leaked: {err}");
}
